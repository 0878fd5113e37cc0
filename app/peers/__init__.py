"""Peers: the connect and disconnect lifecycle, the database (connection, rows, addresses), reconcile, the stale
peer sweep, the audit log and usage accounting."""
