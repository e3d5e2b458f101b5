"""The service: the daemon's lifecycle (start, serve, drain with a deadline, stop) and signals,
systemd notify, the control channel operator commands use, and the healthcheck probe."""
