"""python -m orbmesh_relay: the same as the orbmesh-relay command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
