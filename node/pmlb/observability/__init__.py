"""Counters, logs, the admin HTTP endpoint and (later) tracing."""
