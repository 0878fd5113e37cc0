"""The HTTP edge: the blueprints (WireGuard routes, usage, metrics, OpenAPI, the probe ticket), their schemas,
authentication, rate limits and the one error envelope.  Views load a clean dict and call the domain."""
