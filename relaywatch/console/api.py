"""The HTTP API, /api/v1: the CLI's JSON (relaywatch/views.py) over HTTP.

Reads go to the store the receiving process has open; actions call the code
the CLI calls (relaywatch/actions.py) and are audited with the token's name.
Input is checked (console/api_input.py), each problem a 400 naming the field;
an unknown id is 404; a store refusal (a message being delivered right now) is
409.  No GET changes anything.  The routes are console/api_routes.py's table;
here are their handlers.
"""

from __future__ import annotations

import re
import time

from relaywatch import views
from relaywatch.actions import QUEUE_ACTIONS, queue_action
from relaywatch.config import apply_overrides
from relaywatch.deliver.tls_report import utc_day
from relaywatch.errors import StoreError
from relaywatch.watch.fixes import ACTIONS as FIX_ACTIONS
from relaywatch.incident import IncidentRecord

from relaywatch.console.api_input import (ENTRY_ID, MAX_LIMIT, MAX_TRACES, BadInput, body_of, bool_arg, int_arg,
                                          query_args, queue_page, reason_of)
from relaywatch.console.api_routes import BULK_FILTERS
from relaywatch.console.http import Request, Response, error_response, json_response
from relaywatch.console.jobs import Jobs, begin_bulk, matching_ids
from relaywatch.console.router import Route


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
        entry = await self.store.get(entry_id) if ENTRY_ID.fullmatch(entry_id) else None
        if entry is None:
            return _no_message(entry_id)
        return json_response(200, views.message_detail_json(entry))

    async def trace_show(self, req: Request, route: Route, params: dict, who: str) -> Response:
        query_args(req, route)
        entry_id = params["id"]
        record = await self.store.trace(entry_id) if ENTRY_ID.fullmatch(entry_id) else None
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
        if not ENTRY_ID.fullmatch(entry_id) or await self.store.get(entry_id) is None:
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
        audit_id = await begin_bulk(self.store, who, action, filter_, len(ids), body["reason"], now)
        job = self.jobs.start(self.store, self.app.config, audit_id, action, filter_, ids, who, body["reason"])
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

    async def _incident(self, params: dict) -> IncidentRecord | None:
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
        found = await self._incident(params)
        if found is None:
            return error_response(404, f"no incident {params['id']}")
        inc = found.incident
        try:   # the file's config and the stored overrides, as the CLI plans it
            plan = fixes.plan(action, inc, self.app.file_config, await self.store.overrides())
        except fixes.FixError as exc:
            return error_response(409, str(exc))
        out = {"incident_id": inc.id, "action": action, "dry_run": bool(body.get("dry_run")),
               "steps": plan.steps, "undo": bool(plan.undo), "undo_note": plan.undo_note or None, "done": [],
               "who": who}
        if out["dry_run"]:
            return json_response(200, out)
        try:
            out["done"] = await fixes.apply(self.store, self.app.file_config, inc, plan, who,
                                            body["reason"])
        except StoreError as exc:
            return error_response(409, str(exc))
        self.app.notify()   # as the CLI's SIGUSR1: overrides and the queue are looked at now
        return json_response(200, out)

    async def incident_undo(self, req: Request, route: Route, params: dict, who: str) -> Response:
        from relaywatch.watch import fixes
        query_args(req, route)
        reason = reason_of(req)
        found = await self._incident(params)
        if found is None:
            return error_response(404, f"no incident {params['id']}")
        inc = found.incident
        try:
            lines = await fixes.undo(self.store, inc, who, reason)
        except fixes.FixError as exc:
            return error_response(409, str(exc))
        self.app.notify()   # as the CLI's SIGUSR1: overrides and the queue are looked at now
        return json_response(200, {"incident_id": inc.id, "action": "undo", "dry_run": False, "steps": [],
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
