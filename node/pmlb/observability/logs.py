"""Logging set-up: human text by default, one JSON object per line with --log-format json."""

from __future__ import annotations

import json
import logging
import sys
import time

# Fields a log call may attach (``extra=``) that JSON lines carry as their own
# keys, so operators can query them (mark="...", reason="poison") without
# parsing the message.
FIELDS = ("mark", "client", "upstream", "reason", "trace_id")


def fields(**values: object) -> dict[str, object]:
    """``extra=`` for a log call: the non-empty values among FIELDS."""
    return {k: v for k, v in values.items() if v not in ("", None)}


class JsonFormatter(logging.Formatter):
    def __init__(self, node: str = "") -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.node:
            out["node"] = self.node
        for key in FIELDS:
            value = record.__dict__.get(key)
            if value not in (None, ""):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "info", fmt: str = "text", name: str = "pmlb") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(name))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc's own loggers are chatty at info about reconnects we already report.
    logging.getLogger("grpc").setLevel(logging.WARNING)
