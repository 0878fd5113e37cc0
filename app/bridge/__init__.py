"""Bridge mode: a client reaches the internet through another server (an exit); the exit registry, calls to exits
with one deadline and SmartConnect's choice."""
