"""orbmesh-relay: carries a local WireGuard client's UDP over an OrbMesh
server's tunnel, for networks that let only HTTP(S) out.

    orbmesh-relay --transport ws|http --url https://HOST:PORT --listen 127.0.0.1:PORT \\
                  [--token TOKEN] [--status-interval SECONDS] \\
                  [--insecure | --ca-file PEM] [--http-senders N] [--session NAME]

(also ``python -m orbmesh_relay`` and, on a server install, ``orbmesh-wg relay``).
The token comes from --token or, kept out of the process list, from the
ORBMESH_RELAY_TOKEN environment variable.

The relay binds a UDP socket at --listen; the WireGuard client's Endpoint
points at it.  Datagrams from WireGuard go to the server (docs/tunnel-protocol.md);
datagrams from the server go to the address the last local datagram came from.

Status line, printed to stdout every --status-interval seconds (0 = never),
on SIGUSR1 and once more when the relay stops; its format is stable::

    relay TRANSPORT up=PKTS/BYTES down=PKTS/BYTES dropped=N reconnects=N connected=yes|no

TRANSPORT is ``ws`` or ``http``.  ``up`` counts datagrams (and their bytes)
handed to the server, ``down`` those delivered to local WireGuard.
``dropped`` counts datagrams lost on the way in either direction (no
connection, full queue, failed request, no local address yet).
``reconnects`` counts retries after a lost connection or a failed attempt
(in HTTP mode each request thread retries, and counts, on its own).
``connected`` is whether the last attempt or request succeeded.

Exit status: 0 on SIGTERM/SIGINT, 2 when the server refuses the token (401)
or the options are unusable.

Modules, each importing only those above it (the standard library and
``websockets``; never the server)::

    framing.py   datagram rules and HTTP batch framing, shared with the server
    common.py    what both transports use: counters, backoff, the local UDP port
    ws.py        the WebSocket transport (GET /wireguard/ws)
    http.py      the HTTP transport (POST /wireguard/tunnel)
    relay.py     Relay: a local port, a transport and its threads
    cli.py       options, signals, the status printer; main()

This file imports nothing, so the server can load ``orbmesh_relay.framing``
without any relay code.
"""
