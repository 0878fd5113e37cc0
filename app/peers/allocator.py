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
        for start, stop in ((cursor, self.last), (self.first, cursor - 1)):
            addr = self._first_free(db, start, stop)
            if addr is not None:
                set_meta(db, "next_addr", addr + 1 if addr < self.last else self.first)
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
