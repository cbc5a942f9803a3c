"""The web process: the Flask app factory, health and metrics endpoints, the dashboard."""
