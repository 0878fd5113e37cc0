"""Is a path still carrying?  The relay's own deadline, not TCP's.

A TCP connection whose network went away can sit in retransmission for
minutes before the kernel gives up; a UDP path that is blocked says
nothing at all.  So each transport keeps a Liveness: the moment it sent
something that is not yet answered, and a smoothed round-trip time.
Anything from the server is an answer (a datagram, a pong, a probe
reply, an HTTP response); a probe's reply only for what was sent before
the probe.  Unanswered for SUSPECT_AFTER: the transport
sends its own check (a WebSocket ping, a UDP probe; an HTTP request in
flight is one already).  Unanswered for the deadline, max(DEAD_MIN,
RTT_FACTOR x smoothed RTT) up to DEAD_MAX: the path is dead.  A path
that has sent nothing is never dead: silence is not a failure while
nobody talks (docs/tunnel-protocol.md, "Liveness").

Pure bookkeeping with the time passed in, so tests need no clock.
"""

SUSPECT_AFTER = 0.25
CHECK_EVERY = 0.25  # at most one active check this often
DEAD_MIN = 1.0
DEAD_MAX = 10.0
RTT_FACTOR = 4.0
RTT_GAIN = 0.125  # the weight of a new sample, as TCP's SRTT (RFC 6298)


class Liveness:
    def __init__(self):
        self.unanswered_since = None
        self.last_answer = None
        self.last_check = None
        self.srtt = None

    def sent(self, now):
        if self.unanswered_since is None:
            self.unanswered_since = now

    def answered(self, now, asked_at=None):
        """Something came from the server; a probe's reply (`asked_at`: when the probe went) answers only
        what was sent before the probe: a late reply must not hide a send the blocked path swallowed."""
        self.last_answer = now
        if asked_at is None or self.unanswered_since is None or self.unanswered_since <= asked_at:
            self.unanswered_since = None

    def sample(self, rtt):
        """A measured round trip, seconds."""
        if rtt < 0:
            return
        self.srtt = rtt if self.srtt is None else self.srtt + RTT_GAIN * (rtt - self.srtt)

    def deadline(self):
        if self.srtt is None:
            return DEAD_MIN
        return min(DEAD_MAX, max(DEAD_MIN, RTT_FACTOR * self.srtt))

    def silent_for(self, now):
        """How long something sent has gone unanswered (0: nothing outstanding)."""
        return 0.0 if self.unanswered_since is None else max(0.0, now - self.unanswered_since)

    def needs_check(self, now):
        """Time to send an active check: unanswered for SUSPECT_AFTER, none sent for CHECK_EVERY."""
        if self.silent_for(now) < SUSPECT_AFTER:
            return False
        return self.last_check is None or now - self.last_check >= CHECK_EVERY

    def checked(self, now):
        self.last_check = now

    def dead(self, now):
        return self.silent_for(now) > self.deadline()

    def reset(self):
        """A new connection: nothing outstanding on it yet (the RTT estimate is kept)."""
        self.unanswered_since = None
        self.last_check = None
