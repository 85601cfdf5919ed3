"""The mail log: one line per event, greppable by queue id and Message-ID.

Events: received, attempt, delivered, deferred, bounced, expired, rejected,
notice (an NDR was queued).  Text lines look like Postfix's ``key=value``
lines; with ``server.log_format = "json"`` each line is one JSON object with
the same keys.
"""

from __future__ import annotations

import json
import logging
import sys
import time

logger = logging.getLogger("relaywatch.mail")

_ORDER = ("id", "msgid", "from", "to", "connector", "relay", "delay", "code", "status", "detail")


def emit(event: str, **fields) -> None:
    if logger.isEnabledFor(logging.INFO):
        logger.info(event, extra={"mail_event": event, "mail_fields": fields})


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        event = getattr(record, "mail_event", None)
        if event is None:
            return f"{stamp} {record.levelname.lower()} {record.name}: {record.getMessage()}" + (
                "\n" + self.formatException(record.exc_info) if record.exc_info else "")
        fields = record.mail_fields
        keys = [k for k in _ORDER if k in fields] + [k for k in fields if k not in _ORDER]
        parts = [f"{k}={_text(fields[k])}" for k in keys if fields[k] is not None]
        return f"{stamp} {event} " + " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3)}
        event = getattr(record, "mail_event", None)
        if event is None:
            out.update(level=record.levelname.lower(), logger=record.name, message=record.getMessage())
        else:
            out["event"] = event
            out.update({k: v for k, v in record.mail_fields.items() if v is not None})
        return json.dumps(out, separators=(",", ":"), default=str)


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    s = str(value)
    return f'"{s}"' if (" " in s or not s) else s


def configure(fmt: str = "text", level: int = logging.INFO, stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("relaywatch")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
