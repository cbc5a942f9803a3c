"""What the service tells operators: log records and Prometheus metrics."""
