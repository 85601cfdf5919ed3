"""The HTTP API, /api/v1: the CLI's JSON (relaywatch/views.py) over HTTP.

Reads go to the store the receiving process has open; actions call the code
the CLI calls (relaywatch/actions.py) and are audited with the token's name.
Input is checked here, each problem a 400 naming the field; an unknown id is
404; a store refusal (a message being delivered right now) is 409.  No GET
changes anything.
"""

from __future__ import annotations

import json
import re
import time

from relaywatch import views
from relaywatch.actions import QUEUE_ACTIONS, queue_action
from relaywatch.config import apply_overrides, parse_duration
from relaywatch.deliver.tls_report import utc_day
from relaywatch.errors import StoreError
from relaywatch.store.base import QueryPage
from relaywatch.watch.fixes import ACTIONS as FIX_ACTIONS
from relaywatch.watch.model import Incident

from relaywatch.console.http import Request, Response, error_response, json_response
from relaywatch.console.jobs import Jobs, matching_ids
from relaywatch.console.router import Param, Route

STATUSES = ("queued", "deferred", "held", "active")
ROUTE_KINDS = ("local", "connector", "internet")
MAX_LIMIT = 1000
MAX_TEXT = 200
MAX_TRACES = 100      # entries of one Message-ID a trace search returns
MAX_REASON = 1000
_ENTRY_ID = re.compile(r"[0-9A-Fa-f]{1,32}")


class BadInput(Exception):
    """Input at fault: a 400 (or ``status``) naming the field."""

    def __init__(self, field_name: str, message: str, status: int = 400):
        super().__init__(message)
        self.field = field_name
        self.message = message
        self.status = status


# -- the routes ------------------------------------------------------------------------

_ID = Param("id", "path", {"type": "string", "pattern": "^[0-9A-Fa-f]{16}$"}, "Queue entry id")
_INCIDENT_ID = Param("id", "path", {"type": "integer", "minimum": 1}, "Incident id")
_QUEUE_FILTERS = (
    Param("status", "query", {"type": "string", "enum": list(STATUSES)}, "Only entries in this status"),
    Param("connector", "query", {"type": "string"}, "Only this connector (or local / internet)"),
    Param("sender", "query", {"type": "string"}, "Envelope sender, exact (case-insensitive); empty: <>"),
    Param("recipient", "query", {"type": "string"}, "A recipient address, exact (case-insensitive)"),
    Param("domain", "query", {"type": "string"}, "A recipient's domain"),
    Param("code", "query", {"type": "string"}, "Code of the latest deferral, e.g. 4.4.316"),
    Param("older_than", "query", {"type": "string"}, "Received longer ago than this duration, e.g. 1h"),
    Param("route", "query", {"type": "string", "enum": list(ROUTE_KINDS)},
          "How it is routed: a local mailbox, a connector or the internet (MX)"),
    Param("text", "query", {"type": "string", "minLength": 1, "maxLength": MAX_TEXT},
          "A substring (any case) of the sender, a recipient or a recipient's last reply"),
    Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 100},
          "Entries per page"),
    Param("after", "query", {"type": "string"}, "Page after this id (the previous page's next_after)"),
)
FIX_BODY = {"type": "object", "required": ["reason"], "additionalProperties": False,
            "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": MAX_REASON},
                           "dry_run": {"type": "boolean", "default": False,
                                       "description": "Only say what would be done (the plan), change nothing"}}}
REASON_BODY = {"type": "object", "required": ["reason"], "additionalProperties": False,
               "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": MAX_REASON,
                                         "description": "Why (kept in the audit log with the token's name)"}}}

BULK_FILTERS = ("status", "connector", "sender", "recipient", "domain", "code", "older_than", "route", "text")
BULK_BODY = {"type": "object", "required": ["action", "filter", "reason"], "additionalProperties": False,
             "properties": {"action": {"type": "string", "enum": list(QUEUE_ACTIONS)},
                            "filter": {"type": "object", "additionalProperties": False,
                                       "description": "As GET /api/v1/queue's filters; {} matches every message",
                                       "properties": {name: {"type": "string"} for name in BULK_FILTERS}},
                            "reason": {"type": "string", "minLength": 1, "maxLength": MAX_REASON},
                            "dry_run": {"type": "boolean", "default": False}}}

ROUTES = (
    Route("GET", "/healthz", "healthz", "The process is up", public=True, response="Health"),
    Route("GET", "/readyz", "readyz", "Store, SMTP listener and delivery are working", public=True,
          response="Health", errors=(503,)),
    Route("GET", "/metrics", "metrics", "Prometheus metrics", public=True,
          content_type="text/plain; version=0.0.4"),
    Route("GET", "/api/v1/openapi.json", "openapi", "This document", response=None),
    Route("GET", "/api/v1/queue", "queue_list", "Queued messages, in id order (oldest first), filtered and paged",
          params=_QUEUE_FILTERS, response="MessageList", errors=(400,)),
    Route("GET", "/api/v1/queue/{id}", "queue_show", "One message with its attempt history",
          params=(_ID,), response="MessageDetail", errors=(404,)),
    Route("GET", "/api/v1/messages/{id}/trace", "trace_show",
          "Every event of one message, queued or gone (kept for queue.trace_retention): received, each "
          "attempt, actions and by whom, NDRs, how it ended", params=(_ID,), response="Trace", errors=(404,)),
    Route("GET", "/api/v1/trace", "trace_search", "The traces of every queue entry of a Message-ID",
          params=(Param("message_id", "query", {"type": "string", "minLength": 1, "maxLength": 998},
                        "The Message-ID header's value, with or without <>", required=True),),
          response="TraceList", errors=(400,)),
    Route("GET", "/api/v1/nodes", "nodes", "The nodes sharing this queue: alive, dead or stopped, and the leader",
          response="NodeList"),
    Route("POST", "/api/v1/queue/actions", "queue_bulk",
          "An action on every message a filter matches now: dry_run counts them; otherwise a background job "
          "(202, progress at /api/v1/jobs/{id})", body=BULK_BODY, response="BulkResult", errors=(400, 413, 415)),
    *(Route("POST", f"/api/v1/queue/{{id}}/{action}", "queue_action", summary, params=(_ID,), body=REASON_BODY,
            response="ActionResult", errors=(400, 404, 409, 413, 415))
      for action, summary in (("retry", "Try the message now"), ("hold", "Stop delivery attempts until released"),
                              ("release", "Release a held message; it is tried at once"),
                              ("bounce", "Give up now: NDR to the sender, then remove it"),
                              ("delete", "Remove the message without telling the sender"))),
    Route("GET", "/api/v1/incidents", "incidents_list", "Open incidents (all=true: the history too)",
          params=(Param("all", "query", {"type": "boolean", "default": False}, "Include resolved incidents"),),
          response="IncidentList", errors=(400,)),
    Route("GET", "/api/v1/incidents/{id}", "incident_show",
          "One incident: evidence, diagnosis, actions, notifications, audit",
          params=(_INCIDENT_ID,), response="Incident", errors=(400, 404)),
    Route("POST", "/api/v1/incidents/{id}/fix/{action}", "incident_fix",
          "Fix now: act on an incident (the actions offered are in its actions field); dry_run shows the plan",
          params=(_INCIDENT_ID, Param("action", "path", {"type": "string", "enum": list(FIX_ACTIONS)}, "The action")),
          body=FIX_BODY, response="FixResult", errors=(400, 404, 409, 413, 415)),
    Route("POST", "/api/v1/incidents/{id}/undo", "incident_undo", "Undo the last Fix now action of an incident",
          params=(_INCIDENT_ID,), body=REASON_BODY, response="FixResult", errors=(400, 404, 409, 413, 415)),
    Route("GET", "/api/v1/connectors", "connectors", "Connectors with their state and last good delivery",
          response="ConnectorList"),
    Route("POST", "/api/v1/connectors/{name}/test", "connector_test",
          "Walk the path to a connector (DNS, TCP, greeting, EHLO, STARTTLS, certificate, MAIL/RCPT) without "
          "sending mail; changes nothing, so it takes no body", params=(
              Param("name", "path", {"type": "string"}, "Connector name"),), response="ConnectorTest",
          errors=(404, 413)),
    Route("GET", "/api/v1/config", "config", "The running configuration, Fix now overrides marked",
          response="Config"),
    Route("GET", "/api/v1/jobs", "jobs_list", "Bulk actions of this process, newest first", response="JobList"),
    Route("GET", "/api/v1/jobs/{id}", "job_show", "One bulk action and its progress",
          params=(Param("id", "path", {"type": "integer", "minimum": 1}, "Job id"),), response="Job",
          errors=(404,)),
    Route("GET", "/api/v1/tls-reports", "tls_reports",
          "One UTC day's TLS sessions per recipient domain (RFC 8460 counts) and the report sent for it",
          params=(Param("date", "query", {"type": "string", "format": "date"}, "The UTC day; today by default"),),
          response="TlsReport", errors=(400,)),
    Route("GET", "/api/v1/audit", "audit", "The audit log, newest first",
          params=(Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 100},
                        "Records"),), response="AuditLog", errors=(400,)),
)


# -- input ------------------------------------------------------------------------------

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
    if after is not None and not _ENTRY_ID.fullmatch(after):
        raise BadInput("after", f"after must be a queue id (hex digits), got {after!r}")
    for name in ("connector", "recipient", "domain", "code", "text"):
        if name in args and not args[name].strip():
            raise BadInput(name, f"{name} must not be empty")
    route = args.get("route")
    if route is not None and route not in ROUTE_KINDS:
        raise BadInput("route", f"route must be one of {', '.join(ROUTE_KINDS)} (got {route!r})")
    text = args.get("text")
    if text is not None and len(text) > MAX_TEXT:
        raise BadInput("text", f"text is longer than {MAX_TEXT} characters")
    return QueryPage(status=status, connector=args.get("connector"), sender=args.get("sender"),
                     recipient=args.get("recipient"), domain=args.get("domain"), code=args.get("code"),
                     older_than=older_than, route=route, text=text.strip() if text else None, after=after,
                     limit=int_arg(args, "limit", 100, 1, MAX_LIMIT))


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


# -- the handlers -------------------------------------------------------------------------

class Api:
    def __init__(self, app, openapi_document: dict, metrics_text):
        self.app = app
        self.jobs = Jobs()
        self.openapi_document = openapi_document
        self.metrics_text = metrics_text    # async () -> str (console/server.py)

    @property
    def store(self):
        return self.app.store

    async def openapi(self, req: Request, route: Route, params: dict, who: str) -> Response:
        return json_response(200, self.openapi_document)

    async def queue_list(self, req: Request, route: Route, params: dict, who: str) -> Response:
        page = queue_page(query_args(req, route))
        entries = await self.store.queue_page(page, time.time())
        return json_response(200, dict(views.message_list_json(entries),
                                       next_after=entries[-1].id if len(entries) == page.limit else None))

    async def queue_show(self, req: Request, route: Route, params: dict, who: str) -> Response:
        query_args(req, route)
        entry_id = params["id"]
        entry = await self.store.get(entry_id) if _ENTRY_ID.fullmatch(entry_id) else None
        if entry is None:
            return _no_message(entry_id)
        return json_response(200, views.message_detail_json(entry))

    async def trace_show(self, req: Request, route: Route, params: dict, who: str) -> Response:
        query_args(req, route)
        entry_id = params["id"]
        record = await self.store.trace(entry_id) if _ENTRY_ID.fullmatch(entry_id) else None
        if record is None:
            return error_response(404, f"no message with id {entry_id} in the queue or in the kept traces "
                                       f"(they are kept for queue.trace_retention after a message leaves)")
        return json_response(200, views.trace_json(record))

    async def trace_search(self, req: Request, route: Route, params: dict, who: str) -> Response:
        args = query_args(req, route)
        message_id = args.get("message_id", "").strip()
        if not message_id.strip("<>"):
            raise BadInput("message_id", "message_id is required: the Message-ID header's value")
        return json_response(200, await trace_search(self.store, message_id))

    async def nodes(self, req: Request, route: Route, params: dict, who: str) -> Response:
        from relaywatch.cluster.decisions import Timing
        query_args(req, route)
        server = self.app.config.server
        return json_response(200, views.nodes_json(await self.store.nodes(), await self.store.leader(),
                                                   Timing(server.heartbeat_interval, server.node_lapse),
                                                   time.time()))

    async def queue_action(self, req: Request, route: Route, params: dict, who: str) -> Response:
        query_args(req, route)
        action = route.segments[-1]
        assert action in QUEUE_ACTIONS
        entry_id = params["id"]
        reason = reason_of(req)
        if not _ENTRY_ID.fullmatch(entry_id) or await self.store.get(entry_id) is None:
            return _no_message(entry_id)
        try:
            result = await queue_action(self.store, self.app.config, action, entry_id, who, reason)
        except StoreError as exc:
            return error_response(409, str(exc))
        if not result.done:
            return error_response(409, result.text)
        after = await self.store.get(entry_id)
        return json_response(200, {"id": entry_id.upper(), "action": action, "done": True, "result": result.text,
                                   "who": who, "message": views.message_json(after) if after else None})

    async def queue_bulk(self, req: Request, route: Route, params: dict, who: str) -> Response:
        query_args(req, route)
        body = body_of(req, optional=("action", "filter", "dry_run"))
        action = body.get("action")
        if action not in QUEUE_ACTIONS:
            raise BadInput("action", f"action is required: one of {', '.join(QUEUE_ACTIONS)}")
        filter_ = body.get("filter")
        if not isinstance(filter_, dict):
            raise BadInput("filter", "filter is required: an object of GET /api/v1/queue's filters ({} for all)")
        for key, value in filter_.items():
            if key not in BULK_FILTERS:
                raise BadInput(f"filter.{key}", f"unknown filter {key!r}; known: {', '.join(BULK_FILTERS)}")
            if not isinstance(value, str):
                raise BadInput(f"filter.{key}", f"filter.{key} must be a string, as in the query string")
        try:
            page = queue_page(filter_)
        except BadInput as exc:
            raise BadInput(f"filter.{exc.field}", exc.message) from None
        now = time.time()
        ids = await matching_ids(self.store, page, now)
        out = {"action": action, "filter": filter_, "dry_run": bool(body.get("dry_run")), "matched": len(ids),
               "sample": ids[:10], "job": None}
        if out["dry_run"]:
            return json_response(200, out)
        # Audited before anything is touched: what, by whom, why, how many.
        await self.store.apply_fix(who, f"queue bulk {action}", None,
                                   {"filter": filter_, "matched": len(ids), "reason": body["reason"]}, {}, (), now)
        job = self.jobs.start(self.store, self.app.config, action, filter_, ids, who, body["reason"])
        out["job"] = job.to_dict()
        return json_response(202, out, headers=(("Location", f"/api/v1/jobs/{job.id}"),))

    async def jobs_list(self, req: Request, route: Route, params: dict, who: str) -> Response:
        query_args(req, route)
        return json_response(200, {"jobs": [j.to_dict() for _, j in sorted(self.jobs.jobs.items(), reverse=True)]})

    async def job_show(self, req: Request, route: Route, params: dict, who: str) -> Response:
        query_args(req, route)
        job = self.jobs.jobs.get(int(params["id"])) if params["id"].isdigit() else None
        if job is None:
            return error_response(404, f"no job {params['id']} (jobs are kept in memory until a restart)")
        return json_response(200, job.to_dict())

    async def incidents_list(self, req: Request, route: Route, params: dict, who: str) -> Response:
        include_resolved = bool_arg(query_args(req, route), "all")
        found = await self.store.incidents(include_resolved=include_resolved)
        return json_response(200, views.incident_list_json(found))

    async def incident_show(self, req: Request, route: Route, params: dict, who: str) -> Response:
        query_args(req, route)
        inc = await self._incident(params)
        if inc is None:
            return error_response(404, f"no incident {params['id']}")
        return json_response(200, views.incident_json(inc))

    async def _incident(self, params: dict) -> dict | None:
        text = params["id"]
        if not text.isdigit() or int(text) < 1 or len(text) > 18:
            raise BadInput("id", f"an incident id is a whole number (got {text!r})")
        return await self.store.incident(int(text))

    async def incident_fix(self, req: Request, route: Route, params: dict, who: str) -> Response:
        """The same steps as ``relaywatch incidents fix``: plan, then (unless dry_run) apply."""
        from relaywatch.watch import fixes
        query_args(req, route)
        action = params["action"]
        if action not in FIX_ACTIONS:
            raise BadInput("action", f"unknown action {action!r}; one of {', '.join(FIX_ACTIONS)}")
        body = body_of(req, optional=("dry_run",))
        inc = await self._incident(params)
        if inc is None:
            return error_response(404, f"no incident {params['id']}")
        try:   # the file's config and the stored overrides, as the CLI plans it
            plan = fixes.plan(action, Incident.from_dict(inc), self.app.file_config, await self.store.overrides())
        except fixes.FixError as exc:
            return error_response(409, str(exc))
        out = {"incident_id": inc["id"], "action": action, "dry_run": bool(body.get("dry_run")),
               "steps": plan.steps, "undo": bool(plan.undo), "undo_note": plan.undo_note or None, "done": [],
               "who": who}
        if out["dry_run"]:
            return json_response(200, out)
        try:
            out["done"] = await fixes.apply(self.store, self.app.file_config, Incident.from_dict(inc), plan, who,
                                            body["reason"])
        except StoreError as exc:
            return error_response(409, str(exc))
        self.app.notify()   # as the CLI's SIGUSR1: overrides and the queue are looked at now
        return json_response(200, out)

    async def incident_undo(self, req: Request, route: Route, params: dict, who: str) -> Response:
        from relaywatch.watch import fixes
        query_args(req, route)
        reason = reason_of(req)
        inc = await self._incident(params)
        if inc is None:
            return error_response(404, f"no incident {params['id']}")
        try:
            lines = await fixes.undo(self.store, Incident.from_dict(inc), who, reason)
        except fixes.FixError as exc:
            return error_response(409, str(exc))
        self.app.notify()   # as the CLI's SIGUSR1: overrides and the queue are looked at now
        return json_response(200, {"incident_id": inc["id"], "action": "undo", "dry_run": False, "steps": [],
                                   "undo": False, "undo_note": None, "done": lines, "who": who})

    async def connectors(self, req: Request, route: Route, params: dict, who: str) -> Response:
        query_args(req, route)
        overrides = await self.store.overrides()
        effective = apply_overrides(self.app.file_config, overrides)
        return json_response(200, views.connectors_json(effective, await self.store.open_incidents(),
                                                        await self.store.last_good()))

    async def connector_test(self, req: Request, route: Route, params: dict, who: str) -> Response:
        """As ``relaywatch connector test NAME --json`` (a POST: it connects to the destination)."""
        from relaywatch.watch.probe import probe_connector
        query_args(req, route)
        config = self.app.config
        spec = config.connector(params["name"])
        if spec is None:
            return error_response(404, f"no connector {params['name']!r}; configured: "
                                       f"{', '.join(c.name for c in config.connectors) or 'none'}")
        return json_response(200, views.probe_json(await probe_connector(config, self.app.routes, spec)))

    async def config(self, req: Request, route: Route, params: dict, who: str) -> Response:
        query_args(req, route)
        overrides = await self.store.overrides()
        effective = apply_overrides(self.app.file_config, overrides)
        return json_response(200, views.config_json(self.app.file_config, effective, overrides))

    async def tls_reports(self, req: Request, route: Route, params: dict, who: str) -> Response:
        day = query_args(req, route).get("date") or utc_day(time.time())
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", day):
            raise BadInput("date", f"date {day!r} is not a day such as 2026-11-30")
        counts, reports = await self.store.tls_counts(day), await self.store.tls_reports(day)
        return json_response(200, views.tls_report_json(day, counts, reports))

    async def audit(self, req: Request, route: Route, params: dict, who: str) -> Response:
        limit = int_arg(query_args(req, route), "limit", 100, 1, MAX_LIMIT)
        return json_response(200, {"audit": [views.audit_json(a) for a in await self.store.audit_log(limit)]})


async def trace_search(store, message_id: str) -> dict:
    """TRACE_SEARCH (``queue trace --message-id``, ``GET /api/v1/trace``): one trace per entry, oldest first."""
    traces = []
    for entry_id in (await store.trace_ids(message_id))[:MAX_TRACES]:
        record = await store.trace(entry_id)
        if record is not None:      # pruned or removed between the two reads
            traces.append(views.trace_json(record))
    return {"message_id": message_id, "traces": traces}


def _no_message(entry_id: str) -> Response:
    return error_response(404, f"no queued message with id {entry_id} (delivered, bounced or deleted messages "
                               f"leave the queue)")
