"""Telemetry: resource samplers, Prometheus metrics and structured logging."""
