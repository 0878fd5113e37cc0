"""Running the service: health, metrics, logs, the orbmesh-wg command and graceful shutdown."""
