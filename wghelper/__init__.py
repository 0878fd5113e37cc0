"""OrbMesh root helper: the only process that runs wg and ip."""
