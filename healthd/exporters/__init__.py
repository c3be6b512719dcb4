"""Exporters: Prometheus metrics and the JSON status file, both rendered from snapshots."""
