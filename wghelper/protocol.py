"""Wire protocol between the app and the root helper.

One request per line, one reply per line, on a Unix stream socket::

    +------------------------------------------------------------+----+
    | UTF-8 JSON object (no raw newlines inside)                 | \\n |
    +------------------------------------------------------------+----+
    |<----- requests: SMALL_FRAME bytes, or a batch's limit (below) ----->|
    |<----- replies: at most MAX_FRAME bytes ---------------------------->|

    request: {"id": 7, "cmd": "apply_peers", "args": {...}}
    reply:   {"id": 7, "ok": true,  "result": {...}}
             {"id": 7, "ok": false, "error": {"code": "...", "message": "...",
                                              "details": {...}?}}

A connection may carry many requests, strictly one after another: the
client sends a line, then waits for its reply line.  ``id`` is echoed back
(an integer the client picks; replies to unreadable frames carry null).
A frame longer than its limit is answered with TOO_LARGE and the
connection is closed, because the rest of the stream cannot be trusted.

Limits, checked before a frame is parsed (request_limits), because parsed
JSON takes up to fifty times its size (16 MiB of ``[{},{},...]`` took the
helper from 27 MB to 857 MB):

* a request is at most SMALL_FRAME bytes (4 KiB), and its first
  SMALL_FRAME bytes name its command (``"cmd": "..."``; the app sends it
  second, after ``id``);
* a batch (BATCHES: apply_peers, sync_peers, bridge_rules, limits) carries at
  most one item per pool address (a peer, a key, a rule, a user), so it may have
  SMALL_FRAME + ITEM_BYTES bytes and 64 + ITEM_VALUES JSON values (counted
  as ``{``, ``[`` and ``,``) per address, MAX_FRAME at most.  The helper
  reads, parses and runs one batch over SMALL_FRAME at a time;
* a reply is at most MAX_FRAME (a ``dump_peers`` of 65,534 peers, about
  200 bytes each, with room to spare).

The commands and their arguments are listed in wghelper/requests.py.

Standard library only: the app's workers import this module.
"""
import json
import re

from .errors import ProtocolError

MAX_FRAME = 16 * 1024 * 1024
SMALL_FRAME = 4096
BATCHES = ("apply_peers", "sync_peers", "bridge_rules", "limits")
ITEM_BYTES, ITEM_VALUES = 256, 8  # a peer with two addresses and an IPv6 endpoint is about 230 bytes, 7 values
_CMD_RE = re.compile(rb'"cmd"\s*:\s*"([a-z_]{1,32})"')
# Bridge (multi-hop) mode: the app names an exit tunnel by a slot number below this.
MAX_BRIDGE_SLOTS = 64

# Error codes a reply may carry.
BAD_FRAME = "BAD_FRAME"                # not JSON, not an object, wrong envelope
TOO_LARGE = "TOO_LARGE"                # frame over MAX_FRAME
UNKNOWN_COMMAND = "UNKNOWN_COMMAND"    # cmd not in the helper's table
INVALID_ARGUMENT = "INVALID_ARGUMENT"  # an argument failed validation
COMMAND_FAILED = "COMMAND_FAILED"      # wg or ip exited non-zero or timed out
INTERFACE_DOWN = "INTERFACE_DOWN"      # the interface is not there right now
FORBIDDEN = "FORBIDDEN"                # peer credentials not allowed
INTERNAL = "INTERNAL"                  # a bug in the helper; details are logged

__all__ = ["ProtocolError", "encode", "decode", "parse_request", "ok", "error", "read_frame", "read_request"]


def encode(message):
    """Serialise one message as a frame (bytes ending in a newline)."""
    data = json.dumps(message, separators=(",", ":"), ensure_ascii=True).encode()
    if len(data) + 1 > MAX_FRAME:
        raise ProtocolError(TOO_LARGE, "frame exceeds %d bytes" % MAX_FRAME)
    return data + b"\n"


def decode(line):
    """Parse one frame (without or with its newline, as read_frame or read_request bounded it) into a dict.

    Nesting needs no limit of its own: json stops at its recursion limit, and no validator recurses.
    """
    try:
        message = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(BAD_FRAME, "frame is not valid UTF-8 JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError(BAD_FRAME, "frame must be a JSON object")
    return message


def parse_request(message):
    """Split a decoded request into (id, cmd, args), checking the envelope."""
    req_id = message.get("id")
    if req_id is not None and (not isinstance(req_id, int) or isinstance(req_id, bool)):
        raise ProtocolError(BAD_FRAME, "id must be an integer")
    extra = set(message) - {"id", "cmd", "args"}
    if extra:
        raise ProtocolError(BAD_FRAME, "unknown envelope keys: %s" % ", ".join(sorted(extra)))
    cmd = message.get("cmd")
    if not isinstance(cmd, str):
        raise ProtocolError(BAD_FRAME, "cmd must be a string")
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError(BAD_FRAME, "args must be an object")
    return req_id, cmd, args


def ok(req_id, result):
    return {"id": req_id, "ok": True, "result": result}


def error(req_id, code, message, details=None):
    err = {"code": code, "message": message}
    if details:
        err["details"] = details
    return {"id": req_id, "ok": False, "error": err}


def read_frame(sock_file, limit=MAX_FRAME, head=b""):
    """Read one frame (or its rest, when `head` was read already); None at a clean EOF.

    Reads at most `limit` + 1 bytes in all, so an endless line cannot grow memory.
    """
    line = head if head.endswith(b"\n") else head + sock_file.readline(max(0, limit + 1 - len(head)))
    if not line:
        return None
    # The limit counts the newline, as in encode().
    if len(line) > limit:
        raise ProtocolError(TOO_LARGE, "frame exceeds %d bytes" % limit)
    if not line.endswith(b"\n"):
        raise ProtocolError(BAD_FRAME, "connection closed inside a frame")
    return line[:-1]


def request_limits(head, items):
    """(bytes, JSON values) a request may have, from the command its first bytes `head` name."""
    found = _CMD_RE.search(head[:SMALL_FRAME])
    if found and found.group(1).decode() in BATCHES:
        return min(MAX_FRAME, SMALL_FRAME + ITEM_BYTES * items), 64 + ITEM_VALUES * items
    return SMALL_FRAME, SMALL_FRAME


def read_request(sock_file, head, items):
    """The request that starts with `head` (a readline of SMALL_FRAME + 1), within request_limits for a pool
    of `items` addresses; None at a clean EOF."""
    size, values = request_limits(head, items)
    line = read_frame(sock_file, size, head)
    if line is not None and line.count(b"{") + line.count(b"[") + line.count(b",") > values:
        raise ProtocolError(TOO_LARGE, "frame holds more than %d values" % values)
    return line
