"""The node's DNS resolver for tunnel clients: the health probe of it and its Unbound config."""
