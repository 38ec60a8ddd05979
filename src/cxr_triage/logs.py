"""Logging for every service: one JSON object a line for a collector, or plain text on a terminal.

Log lines carry UIDs, internal ids, AE titles and addresses, never patient names or birth dates
(the end-to-end tests scan the whole service log for them). Non-ASCII text is written as is
(``ensure_ascii=False``) so that such a scan, or a collector's search, sees what was logged.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

#: Libraries whose INFO lines are chatter (a line per PDU, per task received, per request, per
#: highdicom encoding step): kept at WARNING unless the service runs at DEBUG.
CHATTY_LIBRARIES = ("highdicom", "pynetdicom", "celery", "kombu", "amqp", "uvicorn", "uvicorn.access",
                    "uvicorn.error", "botocore", "boto3", "urllib3", "PIL", "matplotlib", "alembic", "httpx",
                    "multipart", "onnxruntime", "monai", "asyncio")


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "service", "pid", "logger", "message"[, "exc"]}`` on one line."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def plain_formatter(service: str) -> logging.Formatter:
    return logging.Formatter(f"%(asctime)s %(levelname)s [{service}:%(process)d] %(name)s: %(message)s")


def resolve_format(configured: str, stream=None) -> str:
    """``json`` or ``plain``: as configured, else plain on a terminal and JSON otherwise."""
    if configured:
        return configured
    stream = stream or sys.stderr
    try:
        return "plain" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def configure(level: str, log_format: str, service: str) -> None:
    """Root logger to stderr in one format; library chatter at WARNING (below only at DEBUG)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if resolve_format(log_format) == "json" else plain_formatter(service))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    quiet = logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(quiet)
    logging.captureWarnings(True)
