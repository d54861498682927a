"""The daemon's log lines as journald and log shippers read them (daemon/serve/logs.py)."""

from __future__ import annotations

import json
import logging

from edgellm.daemon.serve.logs import configure_logging


def emit(capsys, log_format: str, environ: dict) -> str:
    configure_logging("INFO", log_format, environ)
    try:
        logging.getLogger("edgellm.worker").info("generate id=%s ok", "q1")
        return capsys.readouterr().err.strip()
    finally:
        logging.getLogger().handlers.clear()


def test_text_has_one_timestamp_and_none_under_journald(capsys):
    plain = emit(capsys, "text", {})
    assert plain[:2] == "20" and plain.endswith("INFO edgellm.worker: generate id=q1 ok")
    assert emit(capsys, "text", {"JOURNAL_STREAM": "8:1234"}) == "INFO edgellm.worker: generate id=q1 ok"


def test_json_is_one_object_per_line(capsys):
    line = json.loads(emit(capsys, "json", {"JOURNAL_STREAM": "8:1234"}))
    assert line["message"] == "generate id=q1 ok" and line["level"] == "INFO" and line["logger"] == "edgellm.worker"
    assert line["time"][:2] == "20"
