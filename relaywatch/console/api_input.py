"""The HTTP API's input: query parameters and JSON bodies, checked.

Each problem is a ``BadInput`` naming the field (a 400, or its own status);
the limits here are the ones the route table (console/api_routes.py)
publishes in the OpenAPI document.
"""

from __future__ import annotations

import json
import re

from relaywatch.classify.catalog import CATALOG
from relaywatch.config import parse_duration
from relaywatch.store.base import QueryPage

from relaywatch.console.http import Request
from relaywatch.console.router import Route

STATUSES = ("queued", "deferred", "held", "active")
ROUTE_KINDS = ("local", "connector", "internet")
MAX_LIMIT = 1000
MAX_TEXT = 200
MAX_TRACES = 100      # entries of one Message-ID a trace search returns
MAX_REASON = 1000
ENTRY_ID = re.compile(r"[0-9A-Fa-f]{1,32}")
ENHANCED_CODE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")            # RFC 3463: class.subject.detail
CODE_CLASS = re.compile(r"([245](?:\.\d{1,3})?)(?:\.\*)?")       # 4, 4.4, 4.*, 4.4.*
CODE_ACCEPTS = ("an enhanced code (4.4.316), a class or prefix (4, 4.4, 4.4.*) "
                "or a catalog id (connect.refused; relaywatch errors lists them)")


class BadInput(Exception):
    """Input at fault: a 400 (or ``status``) naming the field."""

    def __init__(self, field_name: str, message: str, status: int = 400):
        super().__init__(message)
        self.field = field_name
        self.message = message
        self.status = status




def query_args(req: Request, route: Route) -> dict[str, str]:
    """The query parameters, each given at most once and each one the route knows."""
    known = {p.name for p in route.params if p.where == "query"}
    out = {}
    for name, values in req.query.items():
        if name not in known:
            raise BadInput(name, f"unknown query parameter {name!r}; known: {', '.join(sorted(known)) or 'none'}")
        if len(values) != 1:
            raise BadInput(name, f"{name} is given {len(values)} times")
        out[name] = values[0]
    return out


def int_arg(args: dict, name: str, default: int, lowest: int, highest: int) -> int:
    if name not in args:
        return default
    text = args[name]
    if not text.isdigit() or not lowest <= int(text) <= highest:
        raise BadInput(name, f"{name} must be a whole number from {lowest} to {highest} (got {text!r})")
    return int(text)


def bool_arg(args: dict, name: str) -> bool:
    text = args.get(name, "false").lower()
    if text not in ("true", "false", "1", "0"):
        raise BadInput(name, f"{name} must be true or false (got {args[name]!r})")
    return text in ("true", "1")


def queue_page(args: dict) -> QueryPage:
    status = args.get("status")
    if status is not None and status not in STATUSES:
        raise BadInput("status", f"status must be one of {', '.join(STATUSES)} (got {status!r})")
    older_than = None
    if "older_than" in args:
        try:
            older_than = parse_duration(args["older_than"])
        except ValueError as exc:
            raise BadInput("older_than", f"older_than: {exc}") from None
    after = args.get("after")
    if after is not None and not ENTRY_ID.fullmatch(after):
        raise BadInput("after", f"after must be a queue id (hex digits), got {after!r}")
    for name in ("connector", "recipient", "domain", "code", "text"):
        if name in args and not args[name].strip():
            raise BadInput(name, f"{name} must not be empty")
    code = code_filter(args["code"]) if "code" in args else None
    route = args.get("route")
    if route is not None and route not in ROUTE_KINDS:
        raise BadInput("route", f"route must be one of {', '.join(ROUTE_KINDS)} (got {route!r})")
    text = args.get("text")
    if text is not None and len(text) > MAX_TEXT:
        raise BadInput("text", f"text is longer than {MAX_TEXT} characters")
    return QueryPage(status=status, connector=args.get("connector"), sender=args.get("sender"),
                     recipient=args.get("recipient"), domain=args.get("domain"), code=code,
                     older_than=older_than, route=route, text=text.strip() if text else None, after=after,
                     limit=int_arg(args, "limit", 100, 1, MAX_LIMIT))


def code_filter(text: str) -> str:
    """The ``code`` filter as QueryPage takes it: an exact enhanced code, or a class
    as its prefix and ".*" ("4.4" and "4.4.*" are "4.4.*": every 4.4.x); a catalog
    id is its code (entries sharing that code match too: the store keeps the code)."""
    text = text.strip()
    if ENHANCED_CODE.fullmatch(text):
        return text
    match = CODE_CLASS.fullmatch(text)
    if match:
        return match.group(1) + ".*"
    entry = CATALOG.get(text)
    if entry is not None and ENHANCED_CODE.fullmatch(entry.code):
        return entry.code
    raise BadInput("code", f"code must be {CODE_ACCEPTS} (got {text[:50]!r})")


def reason_of(req: Request, optional: tuple[str, ...] = ()) -> str:
    """The required ``reason`` of an action's JSON body (and no field but ``optional`` ones)."""
    return body_of(req, optional)["reason"]


def body_of(req: Request, optional: tuple[str, ...] = ()) -> dict:
    """An action's JSON body: a required ``reason``, and the ``optional`` fields."""
    content_type = req.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        # Also what keeps a cross-site HTML form from posting here: it cannot send JSON.
        raise BadInput("content-type", "the body must be JSON (Content-Type: application/json)", 415)
    try:
        body = json.loads(req.body.decode("utf-8")) if req.body else None
    except (UnicodeDecodeError, ValueError):
        raise BadInput("body", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadInput("body", 'the body must be a JSON object such as {"reason": "..."}')
    allowed = ("reason", *optional)
    for key in body:
        if key not in allowed:
            raise BadInput(key, f"unknown field {key!r}; this action takes {', '.join(allowed)}")
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise BadInput("reason", "reason is required: a non-empty string saying why (kept in the audit log)")
    if len(reason) > MAX_REASON:
        raise BadInput("reason", f"reason is longer than {MAX_REASON} characters")
    if "dry_run" in body and not isinstance(body["dry_run"], bool):
        raise BadInput("dry_run", "dry_run must be true or false")
    return dict(body, reason=reason.strip())

