"""The console's page handlers, one class per page family; console/web.py's ``Web`` is all of them.

Each handler calls the API's handler in-process (``Web.call``) and renders
what it answered with ``Web.page``; a form's action is the API's action, with
a reason required and a dry run shown before it is confirmed.  A new page:
its route in ``web.PAGES``, its handler in its family here (or a new family
class, added to ``Web``'s bases), its template in console/templates/.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.parse
from datetime import datetime, timedelta, timezone

from relaywatch.config import Config
from relaywatch.errors import RelaywatchError

from relaywatch.console.api_input import ROUTE_KINDS, STATUSES
from relaywatch.console.api_routes import BULK_FILTERS
from relaywatch.console.http import Response
from relaywatch.console.overview import FLOW_EVENTS, chart_svg_data, connector_rows
from relaywatch.console.web_session import form

TLS_REPORT_DAYS = 8           # the day selector's links: today and the seven before it
FORECAST_HOURS = 6
FORECAST_CAP = 10_000
MESSAGE_ACTIONS = ("retry", "hold", "release", "bounce", "delete")
NO_REASON = "A reason is required: say why (it is kept in the audit log)."
_QUEUE_ID = re.compile(r"[0-9A-Fa-f]{16}")
EVENTS_STEP = 1.0             # the overview's event stream looks for a change this often (seconds)
EVENTS_KEEPALIVE = 15.0       # and says something at least this often, so proxies keep it open
EVENTS_SECONDS = 300.0        # then ends: the browser's EventSource reconnects (and shows its session again)


class OverviewPages:
    async def overview_values(self, who: str) -> dict:
        app = self.app
        now = time.time()
        config = app.config
        names = [c.name for c in config.connectors]
        gauges = await app.store.queue_gauges(now)
        expiration = config.queue.message_expiration
        rows = connector_rows(names, gauges, now, expiration)
        counts = self.counts()
        last_hour = self.history.since(now, 3600, counts)
        _, connectors = await self.call("connectors", {}, who)
        state = {c["name"]: c for c in connectors["connectors"]}
        _, incidents = await self.call("incidents_list", {}, who)
        open_incidents = incidents["incidents"]
        horizon = min(FORECAST_HOURS * 3600.0, expiration)
        for name, row in rows.items():
            row["name"] = name
            row["state"] = state.get(name, {}).get("state", "—")
            row["last_good"] = state.get(name, {}).get("last_good_delivery")
            row["delivered_hour"] = last_hour.get(("delivered", name), 0)
            row["incidents"] = [i for i in open_incidents if i["connector"] == name]
            row["expiring"] = 0
            if row["deferred"]:
                row["expiring"] = await app.store.count_deferred_before(
                    name, now - max(expiration - horizon, 0.0), now, FORECAST_CAP + 1)
        ordered = sorted(rows.values(), key=lambda r: (not r["incidents"], not r["deferred"], r["name"]))
        hourly = self.history.hourly(now, counts)
        return {"now": now, "connectors": ordered, "configured": names, "incidents": open_incidents,
                "horizon_hours": horizon / 3600,
                "forecast_cap": FORECAST_CAP, "chart": chart_svg_data(hourly),
                "totals": {e: sum(h[e] for h in hourly) for e in FLOW_EVENTS},
                "counting_since": self.history.started}

    async def overview(self, req, params, session, who) -> Response:
        return self.page(200, "overview.html", session, **await self.overview_values(who))

    async def overview_fragment(self, req, params, session, who) -> Response:
        return self.page(200, "overview_live.html", session, **await self.overview_values(who))

    async def overview_events(self, req, params, session, who) -> Response:
        """Server-sent events: the overview's live part (the fragment above) whenever it changed,
        looked at every EVENTS_STEP; the stream ends when the session does, or after EVENTS_SECONDS."""
        async def stream():
            sent, quiet, started = None, 0.0, time.monotonic()
            while time.monotonic() - started < EVENTS_SECONDS and self.still_allowed(req, who):
                try:
                    html = self.page(200, "overview_live.html", session, **await self.overview_values(who)).body
                except RelaywatchError:
                    html = sent          # the store did not answer: the next look may
                if html != sent:
                    sent, quiet = html, 0.0
                    yield sse_event(html.decode())
                elif quiet >= EVENTS_KEEPALIVE:
                    quiet = 0.0
                    yield b": still here\n\n"
                await asyncio.sleep(EVENTS_STEP)
                quiet += EVENTS_STEP
        return Response(200, content_type="text/event-stream; charset=utf-8", stream=stream)


def sse_event(text: str) -> bytes:
    """One server-sent event carrying ``text``: a ``data:`` line per line of it."""
    return ("".join(f"data: {line}\n" for line in text.replace("\r", "").split("\n")) + "\n").encode()


class IncidentPages:
    async def incident(self, req, params, session, who) -> Response:
        status, inc = await self.call("incident_show", params, who)
        if status != 200:
            return self.page(status, "error.html", session, message=inc.get("error", "no such incident"))
        return self.page(200, "incident.html", session, inc=inc, plan=None, result=None, error=None)

    async def incident_fix(self, req, params, session, who) -> Response:
        fields = form(req)
        reason = fields.get("reason", "").strip()
        confirm = fields.get("confirm") == "yes"
        status, out = await self.call("incident_fix", params, who, body={"reason": reason or "-", "dry_run": True})
        _, inc = await self.call("incident_show", {"id": params["id"]}, who)
        if "id" not in inc:
            return self.page(status, "error.html", session, message=out.get("error", "no such incident"))
        if status != 200:
            return self.page(status, "incident.html", session, inc=inc, plan=None, result=None,
                             error=out.get("error"))
        if not reason:
            return self.page(400, "incident.html", session, inc=inc, plan=None, result=None,
                             error=NO_REASON)
        if not confirm:   # the confirm step: the dry run, and a button that applies it
            return self.page(200, "incident.html", session, inc=inc, plan=out, reason=reason,
                             action=params["action"], result=None, error=None)
        status, out = await self.call("incident_fix", params, who, body={"reason": reason})
        _, inc = await self.call("incident_show", {"id": params["id"]}, who)
        return self.page(status, "incident.html", session, inc=inc, plan=None,
                         result=out if status == 200 else None, error=None if status == 200 else out.get("error"))

    async def incident_undo(self, req, params, session, who) -> Response:
        reason = form(req).get("reason", "").strip()
        if not reason:
            status, out = 400, {"error": NO_REASON}
        else:
            status, out = await self.call("incident_undo", params, who, body={"reason": reason})
        _, inc = await self.call("incident_show", {"id": params["id"]}, who)
        if "id" not in inc:
            return self.page(404, "error.html", session, message=inc.get("error", "no such incident"))
        return self.page(status, "incident.html", session, inc=inc, plan=None,
                         result=out if status == 200 else None, error=None if status == 200 else out.get("error"))


class QueuePages:
    def queue_filter(self, req) -> dict[str, str]:
        return {k: v[0] for k, v in req.query.items() if k in (*BULK_FILTERS, "after") and v and v[0].strip()}

    async def queue(self, req, params, session, who) -> Response:
        filters = self.queue_filter(req)
        status, out = await self.call("queue_list", {}, who, query={**filters, "limit": "100"})
        error = out.get("error") if status != 200 else None
        return self.page(200 if status == 200 else status, "queue.html", session, filters=filters,
                         messages=out.get("messages", []), next_after=out.get("next_after"), error=error,
                         statuses=STATUSES, route_kinds=ROUTE_KINDS, connectors=[c.name for c in self.app.config.connectors],
                         plan=None, result=None, actions=MESSAGE_ACTIONS)

    async def queue_bulk(self, req, params, session, who) -> Response:
        fields = form(req)
        filters = {k[2:]: v for k, v in fields.items() if k.startswith("f_") and k[2:] in BULK_FILTERS and v.strip()}
        action, reason = fields.get("action", ""), fields.get("reason", "").strip()
        confirm = fields.get("confirm") == "yes"
        body = {"action": action, "filter": filters, "reason": reason or "-", "dry_run": not confirm or not reason}
        status, out = await self.call("queue_bulk", {}, who, body=body)
        _, listed = await self.call("queue_list", {}, who, query={**filters, "limit": "100"})
        error = out.get("error") if status not in (200, 202) else None
        if not reason and error is None:
            error = NO_REASON
        return self.page(200 if error is None else 400, "queue.html", session, filters=filters,
                         messages=listed.get("messages", []), next_after=listed.get("next_after"), error=error,
                         statuses=STATUSES, route_kinds=ROUTE_KINDS,
                         connectors=[c.name for c in self.app.config.connectors], plan=out if error is None and not confirm else None, reason=reason, bulk_action=action,
                         result=out if error is None and confirm else None,
                         actions=MESSAGE_ACTIONS)

    async def message(self, req, params, session, who) -> Response:
        status, msg = await self.call("queue_show", params, who)
        trace = await self.message_trace(who, params["id"])
        if status != 200 and trace is not None:   # it left the queue: what was kept of it
            return self.page(200, "trace.html", session, q=params["id"], traces=[trace], error=None)
        if status != 200:
            return self.page(status, "error.html", session, message=msg.get("error", "no such message"))
        return self.page(200, "message.html", session, msg=msg, trace=trace, result=None, error=None,
                         actions=MESSAGE_ACTIONS)

    async def message_action(self, req, params, session, who) -> Response:
        reason = form(req).get("reason", "").strip()
        result, error = None, None
        if params["action"] not in MESSAGE_ACTIONS:
            error = f"unknown action {params['action']!r}"
        elif not reason:
            error = NO_REASON
        else:
            status, out = await self.call("queue_action", params, who, body={"reason": reason})
            result, error = (out, None) if status == 200 else (None, out.get("error"))
        status, msg = await self.call("queue_show", {"id": params["id"]}, who)
        if status != 200:   # bounced or deleted: it left the queue
            return self.page(200 if result else 404, "error.html", session,
                             message=result["result"] if result else msg.get("error"))
        return self.page(200 if error is None else 400, "message.html", session, msg=msg, result=result,
                         trace=await self.message_trace(who, params["id"]), error=error, actions=MESSAGE_ACTIONS)


class ConnectorPages:
    async def connector(self, req, params, session, who, test=None) -> Response:
        _, listed = await self.call("connectors", {}, who)
        found = [c for c in listed["connectors"] if c["name"] == params["name"]]
        if not found:
            return self.page(404, "error.html", session, message=f"No connector {params['name']!r}")
        _, config = await self.call("config", {}, who)
        spec = next(c for c in config["connectors"] if c["name"] == params["name"])
        _, incidents = await self.call("incidents_list", {}, who)
        mine = [i for i in incidents["incidents"] if i["connector"] == params["name"]]
        return self.page(200, "connector.html", session, c=found[0], spec=spec, incidents=mine, test=test)

    async def connector_test(self, req, params, session, who) -> Response:
        status, out = await self.call("connector_test", params, who)
        if status != 200:
            return self.page(status, "error.html", session, message=out.get("error"))
        return await self.connector(req, params, session, who, test=out)


class AuditPages:
    async def audit(self, req, params, session, who) -> Response:
        _, out = await self.call("audit", {}, who, query={"limit": "200"})
        return self.page(200, "audit.html", session, audit=out["audit"])


class TracePages:
    """The message trace (``GET /api/v1/messages/{id}/trace``, ``GET /api/v1/trace``): replies and
    banners in it are remote text, escaped as in every template."""

    async def trace_page(self, req, params, session, who) -> Response:
        """/trace?q=...: a queue id, or a Message-ID (every entry it made)."""
        q = ((req.query.get("q") or [""])[0]).strip()
        traces, error = [], None
        if _QUEUE_ID.fullmatch(q):
            status, out = await self.call("trace_show", {"id": q}, who)
            traces, error = ([out], None) if status == 200 else ([], out.get("error"))
        elif q:
            status, out = await self.call("trace_search", {}, who, query={"message_id": q})
            traces, error = (out["traces"], None) if status == 200 else ([], out.get("error"))
            if status == 200 and not traces:
                error = f"No queued or kept message has the Message-ID {q}."
        return self.page(200 if error is None else 404 if q else 200, "trace.html", session, q=q, traces=traces,
                         error=error)

    async def message_trace(self, who: str, entry_id: str) -> dict | None:
        """The trace for the message page (None: neither queued nor kept)."""
        status, out = await self.call("trace_show", {"id": entry_id}, who)
        return out if status == 200 else None


class NodePages:
    async def nodes_page(self, req, params, session, who) -> Response:
        _, out = await self.call("nodes", {}, who)
        return self.page(200, "nodes.html", session, nodes=out["nodes"], leader_term=out["leader_term"],
                         lapse=out["lapse"])


class TlsReportPages:
    """TLS reporting (RFC 8460): one UTC day per policy domain, from ``GET /api/v1/tls-reports``
    (views.tls_report_json, as ``tls-report show``). MX names, policy lines and failure
    details come from the partner's DNS, policy server and MX: remote text, escaped."""

    async def tls_reports_page(self, req, params, session, who) -> Response:
        day = ((req.query.get("date") or [""])[0]).strip()
        status, out = await self.call("tls_reports", {}, who, query={"date": day} if day else {})
        today = datetime.now(timezone.utc).date()
        days = [(today - timedelta(days=n)).isoformat() for n in range(TLS_REPORT_DAYS)]
        if status != 200:
            return self.page(status, "tls_reports.html", session, day=day, days=days, domains=[],
                             error=out.get("error"), enabled=self.app.config.tls_reporting.enabled)
        return self.page(200, "tls_reports.html", session, day=out["day"], days=days, domains=out["domains"],
                         error=None, enabled=self.app.config.tls_reporting.enabled)


def notified_to(config: Config, channel: str) -> str:
    """Where a notification channel sends, for the incident page: the admin addresses, or the
    webhook's scheme and host only (its path or query may hold a secret)."""
    if channel == "email":
        return ", ".join(config.alerts.notify) or "—"
    if channel == "webhook" and config.alerts.webhook_url:
        url = urllib.parse.urlsplit(config.alerts.webhook_url)
        return f"{url.scheme}://{url.hostname or ''}" + (f":{url.port}" if url.port else "")
    return "—"
