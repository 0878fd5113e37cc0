"""The tunnels for clients without UDP: the WebSocket and HTTP routes, the WebSocket engine, the HTTP sessions
and the UDP pipe to WireGuard on loopback."""
