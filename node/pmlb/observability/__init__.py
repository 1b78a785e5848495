"""Counters, metrics, logs, tracing, the admin HTTP endpoint and the dashboards."""
