"""Client addresses: next-fit allocation over the pool, in the database's own index."""
import ipaddress

from ..failures import PoolExhausted
from .db import get_meta, set_meta


class Allocator:
    """Next-fit allocation over the pool, without materialising it.

    A cursor in ``meta`` remembers where the last address was handed out;
    the search walks forward through the index, jumping over each run of
    taken addresses with one query, and wraps once.  Usually that is one
    or two index lookups, whatever the pool size.
    """

    def __init__(self, pool, gateway):
        pool = ipaddress.IPv4Network(pool)
        self.first = int(pool.network_address) + 1
        self.last = int(pool.broadcast_address) - 1
        self.gateway = int(ipaddress.IPv4Address(gateway))
        self.size = self.last - self.first + 1 - (1 if self.first <= self.gateway <= self.last else 0)

    def allocate(self, db):
        """Return a free address (int); call inside db.write(). Raises PoolExhausted."""
        cursor = int(get_meta(db, "next_addr", self.first))
        if not self.first <= cursor <= self.last:
            cursor = self.first
        # After a wrap the walk starts where the last one from the start of the pool ended: a pool
        # grown to 60,000 is one run of taken addresses there, and walking it took 0.2 s under the
        # write lock at every wrap (bench/control_plane.py).  An address freed below that point is
        # still found, by the last walk, when everything above it is taken.
        hint = int(get_meta(db, "dense_to", self.first))
        if not self.first <= hint <= self.last:
            hint = self.first
        if cursor <= hint:  # the cursor is inside that run: go on after it
            segments = ((hint, self.last), (self.first, hint - 1))
        else:
            segments = ((cursor, self.last), (hint, cursor - 1), (self.first, hint - 1))
        for start, stop in segments:
            addr = self._first_free(db, start, stop)
            if addr is not None:
                set_meta(db, "next_addr", addr + 1 if addr < self.last else self.first)
                if start in (hint, self.first):  # everything from the start of the pool to addr is taken
                    set_meta(db, "dense_to", addr)
                return addr
        raise PoolExhausted("No free addresses left in the pool")

    def _first_free(self, db, start, stop):
        addr = start
        while addr <= stop:
            if addr == self.gateway:
                addr += 1
                continue
            if db.execute("SELECT 1 FROM peers WHERE addr = ?", (addr,)).fetchone() is None:
                return addr
            addr = db.execute(
                "SELECT p.addr + 1 FROM peers p WHERE p.addr >= ? AND NOT EXISTS "
                "(SELECT 1 FROM peers q WHERE q.addr = p.addr + 1) ORDER BY p.addr LIMIT 1",
                (addr,)).fetchone()[0]
        return None

    def free(self, db):
        taken = db.execute("SELECT count(*) FROM peers WHERE addr BETWEEN ? AND ?",
                           (self.first, self.last)).fetchone()[0]
        return self.size - taken
