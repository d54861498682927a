"""How the daemon logs: one line per event; under journald without a timestamp of our own (journald adds one),
or one JSON object per line (`log_format = "json"`) for a log shipper."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL = "%(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str, log_format: str, environ: Mapping[str, str] = os.environ) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(JOURNAL if environ.get("JOURNAL_STREAM") else TEXT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
