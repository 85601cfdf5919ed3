"""The mail log: one line per event, greppable by queue id and Message-ID.

Events: received, delivered, deferred, bounced, expired (the last two say
whether an NDR was queued), rejected (at RCPT, DATA or connect).  Text lines look like Postfix's ``key=value``
lines; with ``server.log_format = "json"`` each line is one JSON object with
the same keys.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import sys
import time

_ORDER = ("id", "msgid", "from", "to", "connector", "relay", "delay", "code", "status", "detail")


class _Writer:
    """Formats events straight to a buffered stream, without logging's
    per-record machinery (it was a tenth of the receive path's CPU).  The
    buffer is flushed within 100 ms, and at exit."""

    def __init__(self, fmt: str, stream):
        self.json = fmt == "json"
        self.stream = stream
        # Lines are kept here, not in the stream: stderr is line-buffered even
        # into a file, which would cost a write() per message.
        self._lines: list[str] = []
        self._flush_pending = False

    def write(self, event: str, fields: dict) -> None:
        now = time.time()
        if self.json:
            out = {"ts": round(now, 3), "event": event}
            out.update((k, v) for k, v in fields.items() if v is not None)
            line = json.dumps(out, separators=(",", ":"), default=str)
        else:
            line = _text_line(now, event, fields)
        self._lines.append(line)
        if not self._flush_pending:
            self._flush_pending = True
            try:
                asyncio.get_running_loop().call_later(0.1, self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._flush_pending = False
        lines, self._lines = self._lines, []
        try:
            if lines:
                self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass


_writer: _Writer | None = None
logger = logging.getLogger("relaywatch.mail")

# Events counted for /metrics (console/metrics.py), by (event, connector, code).
# Counting here, where every path logs, counts every path: deliveries,
# deferrals and bounces by the scheduler, bounces by an operator, rejections
# at RCPT or DATA.  The labels are bounded: connector names come from the
# config (or "local", "internet"), codes are status codes; never an address
# or a domain.  Each process counts its own events; in the two-process
# topology the delivery process exports its counts (console/metrics.py).
COUNTED = ("received", "delivered", "deferred", "bounced", "expired", "rejected",
           "auth", "auth_failed", "auth_blocked", "auth_refused",     # SMTP AUTH (receive/login.py)
           "possible_duplicate")                                      # deliver/handover.py
counts: dict[tuple[str, str, str], int] = {}


def _count(event: str, fields: dict) -> None:
    # The "bounced" event without a status says only that no DSN could be
    # sent for a recipient already counted as bounced or expired.
    if event in ("delivered", "deferred", "bounced", "expired") and "status" not in fields:
        return
    code = fields.get("code") if event in ("deferred", "rejected") else None
    key = (event, fields.get("connector") or "", code or "")
    counts[key] = counts.get(key, 0) + 1


def emit(event: str, **fields) -> None:
    if event in COUNTED:
        _count(event, fields)
    if _writer is not None:
        _writer.write(event, fields)
    elif logger.isEnabledFor(logging.INFO):
        # Not configured (library use, tests): through logging.
        logger.info(event, extra={"mail_event": event, "mail_fields": fields})


def _text_line(ts: float, event: str, fields: dict) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
    keys = [k for k in _ORDER if k in fields] + [k for k in fields if k not in _ORDER]
    return f"{stamp} {event} " + " ".join(f"{k}={_text(fields[k])}" for k in keys if fields[k] is not None)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        event = getattr(record, "mail_event", None)
        if event is None:
            return f"{stamp} {record.levelname.lower()} {record.name}: {record.getMessage()}" + (
                "\n" + self.formatException(record.exc_info) if record.exc_info else "")
        return _text_line(record.created, event, record.mail_fields)


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
    """Mail events to ``stream`` (default stderr, buffered); other logs too, unbuffered."""
    global _writer
    stream = stream or sys.stderr
    _writer = _Writer(fmt, stream)
    atexit.register(_writer.flush)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("relaywatch")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def unconfigure() -> None:
    global _writer
    if _writer is not None:
        _writer.flush()
    _writer = None
    root = logging.getLogger("relaywatch")
    root.handlers[:] = []
    root.propagate = True
