"""orbmesh-relay: carries a local WireGuard client's UDP to an OrbMesh node over
whichever path works: UDP straight to its WireGuard port, or its WebSocket
or HTTP tunnel for networks that let only HTTP(S) out.

    orbmesh-relay --transport auto|udp|ws|http --url https://HOST:PORT --listen 127.0.0.1:PORT \\
                  [--token TOKEN] [--endpoint HOST:PORT] [--status-interval SECONDS] \\
                  [--status-file PATH] [--insecure | --ca-file PEM] [--http-senders N] [--session NAME]

(also ``python -m orbmesh_relay`` and, on a server install, ``orbmesh-wg relay``).
The token comes from --token or, kept out of the process list, from the
ORBMESH_RELAY_TOKEN environment variable.

The relay binds a UDP socket at --listen; the WireGuard client's Endpoint
points at it.  Datagrams from WireGuard go to the node (docs/tunnel-protocol.md);
datagrams from the node go to the address the last local datagram came from.
``auto`` picks the path and moves between them as the network changes,
without a new WireGuard handshake (auto.py); ``udp``, ``ws`` and ``http``
keep one.  --endpoint is the node's WireGuard endpoint for UDP (connect's
``serverEndpoint``; default: the --url host, port 51820).

Status line, printed to stdout every --status-interval seconds (0 = never),
on SIGUSR1 (where the platform has it) and once more when the relay stops;
its format is stable, fields may be added at the end::

    relay TRANSPORT up=PKTS/BYTES down=PKTS/BYTES dropped=N reconnects=N connected=yes|no rtt=MSms|- switches=N

TRANSPORT is the transport carrying datagrams now: ``udp``, ``ws``, ``http``
(``none`` while auto mode is still connecting).  ``up`` counts datagrams
(and their bytes) handed to the node, ``down`` those delivered to local
WireGuard.  ``dropped`` counts datagrams lost on the way in either
direction (no connection, full queue, failed request, no local address
yet, not WireGuard).  ``reconnects`` counts retries after a lost connection
or a failed attempt (in HTTP mode each request thread retries, and counts,
on its own).  ``connected`` is whether the path in use works now.  ``rtt``
is its round-trip time (pings, probes, requests), ``switches`` how often
auto mode changed transport.  --status-file PATH gets the same and more as
JSON (status.py; every switch with its reason).

Exit status: 0 on SIGTERM/SIGINT, 2 when the server refuses the token (401)
or the device (403), or the options are unusable.

Modules, each importing only those above it (the standard library and
``websockets``; never the server)::

    framing.py   datagram rules and HTTP batch framing, shared with the server
    probe.py     the UDP probe's wire format, shared with the server
    liveness.py  the relay's own deadline on a path's answers
    route.py     which local address reaches the server now
    udpio.py     UDP in and out: GSO/GRO on Linux, plain elsewhere
    common.py    what every transport uses: counters, backoff, the local UDP port
    udp.py       the UDP transport and its probes
    ws.py        the WebSocket transport (GET /wireguard/ws)
    http.py      the HTTP transport (POST /wireguard/tunnel)
    auto.py      --transport auto: the state machine
    status.py    the JSON status
    relay.py     Relay: a local port, a controller, its transports and threads
    cli.py       options, signals, the status printer; main()

This file imports nothing, so the server can load ``orbmesh_relay.framing``
and ``orbmesh_relay.probe`` without any relay code.
"""
