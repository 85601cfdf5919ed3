"""The console's web pages: server-rendered HTML (Jinja2), one CSS file, one small JS file.

Every page is built from the API's own JSON (console/api.py, the shapes of
docs/json.md): a page handler calls the API handler in-process and renders
what it answered, and every action the pages offer is the API's action (so
the audit, the refusals and the dry runs are the same code as the CLI's).

Access, besides the console's rules (console/auth.py):

- without tokens, a loopback client naming the console by a loopback host
  gets in as "loopback"; with tokens, the browser logs in once with a token
  (POST /login) and keeps a session cookie: HttpOnly, SameSite=Strict,
  Secure over HTTPS, signed with a key made at start (a restart logs out);
- every POST carries the session's CSRF token in a hidden field (checked
  here, in constant time) besides the same-origin check of console/server.py;
- every action asks for a reason, and the API audits it with the session's name.

Text from remote servers (banners, replies, certificate names) is the
attacker's: every template is autoescaped, and no page has inline script
(the Content-Security-Policy of http.py forbids it).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import hashlib
import hmac
import json
import secrets
import time
import urllib.parse
from dataclasses import dataclass, replace
from importlib import resources

import jinja2

from relaywatch import events
from relaywatch.classify.catalog import lookup
from relaywatch.model import iso
from relaywatch.store.base import QueryPage

from relaywatch.console import metrics
from relaywatch.console.api import BULK_FILTERS, ROUTES as API_ROUTES, STATUSES, BadInput
from relaywatch.console.auth import authenticate, token_name
from relaywatch.console.http import Request, Response
from relaywatch.console.router import Route, match

COOKIE = "relaywatch_session"
SESSION_SECONDS = 12 * 3600
FORECAST_HOURS = 6
FORECAST_CAP = 10_000
HISTORY_STEP = 60.0            # a sample of the event counters every minute ...
HISTORY_KEEP = 24 * 3600.0     # ... for the last 24 h (the overview's chart)
HTML = "text/html; charset=utf-8"
STATIC = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}

PAGES = (
    Route("GET", "/", "overview", "Overview"),
    Route("GET", "/fragments/overview", "overview_fragment", "The overview's live part"),
    Route("GET", "/login", "login_form", "Log in", public=True),
    Route("POST", "/login", "login", "Log in with a token", public=True),
    Route("POST", "/logout", "logout", "Log out"),
    Route("GET", "/static/{name}", "static", "CSS and JS", public=True),
    Route("GET", "/incidents/{id}", "incident", "One incident"),
    Route("POST", "/incidents/{id}/fix/{action}", "incident_fix", "Fix now (confirm shows the dry run)"),
    Route("POST", "/incidents/{id}/undo", "incident_undo", "Undo the last Fix now action"),
    Route("GET", "/queue", "queue", "The queue"),
    Route("POST", "/queue/actions", "queue_bulk", "A bulk action (confirm shows the dry run)"),
    Route("GET", "/queue/{id}", "message", "One message"),
    Route("POST", "/queue/{id}/{action}", "message_action", "An action on one message"),
    Route("GET", "/connectors/{name}", "connector", "One connector"),
    Route("POST", "/connectors/{name}/test", "connector_test", "Test a connector"),
    Route("GET", "/audit", "audit", "The audit log"),
)


def is_page(path: str) -> bool:
    """Is this a console page (this module) rather than the API, metrics or health?"""
    return not path.startswith("/api/") and path not in ("/metrics", "/healthz", "/readyz")


# -- sessions and CSRF (pure) ----------------------------------------------------------------

@dataclass(frozen=True)
class Session:
    id: str
    who: str
    issued: float


class Sessions:
    """Signed session cookies: ``<id>.<who, base64>.<issued>.<HMAC-SHA256>`` under a per-process key."""

    def __init__(self, key: bytes | None = None):
        self.key = key or secrets.token_bytes(32)
        self.ended: set[str] = set()     # logged out: a copy of the cookie no longer works

    def _mac(self, text: str) -> str:
        return hmac.new(self.key, text.encode(), hashlib.sha256).hexdigest()

    def new(self, who: str, now: float) -> tuple[Session, str]:
        session = Session(secrets.token_hex(16), who, now)
        body = f"{session.id}.{base64.urlsafe_b64encode(who.encode()).decode()}.{int(now)}"
        return session, f"{body}.{self._mac(body)}"

    def read(self, cookie_header: str | None, now: float) -> Session | None:
        value = cookies(cookie_header).get(COOKIE)
        if not value or value.count(".") != 3:
            return None
        body, _, mac = value.rpartition(".")
        if not hmac.compare_digest(self._mac(body), mac):
            return None
        sid, who64, issued = body.split(".")
        try:
            who = base64.urlsafe_b64decode(who64.encode()).decode()
            issued_at = float(int(issued))
        except ValueError:
            return None
        if not 0 <= now - issued_at <= SESSION_SECONDS or sid in self.ended:
            return None
        return Session(sid, who, issued_at)

    def csrf(self, session: Session) -> str:
        return self._mac(f"csrf:{session.id}")

    def csrf_ok(self, session: Session, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(self.csrf(session), presented)


def cookies(header: str | None) -> dict[str, str]:
    out = {}
    for part in (header or "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            out.setdefault(name, value)
    return out


def cookie_header(value: str, secure: bool, max_age: int = SESSION_SECONDS) -> str:
    return (f"{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}"
            + ("; Secure" if secure else ""))


def form(req: Request) -> dict[str, str]:
    """A urlencoded form body: each field once (the last wins)."""
    if req.headers.get("content-type", "").split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        return {}
    try:
        text = req.body.decode("utf-8")
    except UnicodeDecodeError:
        return {}
    return {k: v[-1] for k, v in urllib.parse.parse_qs(text, keep_blank_values=True).items()}


def safe_next(target: str | None) -> str:
    """Only a path on this console (never //host or a scheme): no open redirect."""
    if (not target or not target.startswith("/") or target.startswith("//") or "\\" in target
            or any(ord(c) < 32 or ord(c) == 127 for c in target)):
        return "/"
    return target


# -- the overview's numbers (pure) ----------------------------------------------------------------

FLOW_EVENTS = ("delivered", "deferred", "bounced")


def flow_counts(counts: dict[tuple[str, str, str], int]) -> dict[tuple[str, str], int]:
    """{(event, connector): recipients} of the counted events (expired counts as bounced: it was returned)."""
    out: dict[tuple[str, str], int] = {}
    for (event, connector, _code), n in counts.items():
        event = "bounced" if event == "expired" else event
        if event in FLOW_EVENTS:
            out[(event, connector)] = out.get((event, connector), 0) + n
    return out


class FlowHistory:
    """Samples of the cumulative event counters, for "delivered in the last hour" and the 24 h chart.

    The store keeps no delivered mail, so this is the counters of this
    process since it started (the page says so), sampled every minute."""

    def __init__(self, started: float, baseline: dict[tuple[str, str], int] | None = None):
        # The counters may not be zero at start (they are the process's, and a console
        # can start later than it): what they say then is the zero of the chart.
        self.started = started
        self.samples: list[tuple[float, dict[tuple[str, str], int]]] = [(started, dict(baseline or {}))]

    def add(self, now: float, counts: dict[tuple[str, str], int]) -> None:
        self.samples.append((now, dict(counts)))
        while len(self.samples) > 2 and self.samples[1][0] < now - HISTORY_KEEP - HISTORY_STEP:
            self.samples.pop(0)

    def at(self, when: float) -> dict[tuple[str, str], int]:
        """The counts of the last sample at or before ``when`` (none before start: zero)."""
        i = bisect.bisect_right(self.samples, when, key=lambda sample: sample[0])
        return self.samples[max(i, 1) - 1][1]   # before start: the baseline

    def since(self, now: float, seconds: float, counts: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
        before = self.at(now - seconds)
        return {k: n - before.get(k, 0) for k, n in counts.items() if n - before.get(k, 0)}

    def hourly(self, now: float, counts: dict[tuple[str, str], int], hours: int = 24) -> list[dict[str, int]]:
        """Per hour, oldest first: {event: recipients} over every connector."""
        out = []
        for h in range(hours, 0, -1):
            start, end = now - h * 3600, now - (h - 1) * 3600
            a, b = self.at(start), (counts if h == 1 else self.at(end))
            out.append({e: sum(n - a.get((ev, c), 0) for (ev, c), n in b.items() if ev == e) for e in FLOW_EVENTS})
        return out


def chart_svg_data(hourly: list[dict[str, int]], width: int = 480, height: int = 80) -> dict:
    """Bars for an inline SVG: one group per hour, delivered / deferred / bounced side by side."""
    top = max([max(h.values(), default=0) for h in hourly] + [1])
    slot = width / max(len(hourly), 1)
    bar = max(slot / 3 - 1, 1)
    bars = []
    for i, h in enumerate(hourly):
        for j, event in enumerate(FLOW_EVENTS):
            n = h[event]
            tall = round(n / top * (height - 4), 1)
            bars.append({"x": round(i * slot + j * bar, 1), "y": round(height - tall, 1), "w": round(bar, 1),
                         "h": tall, "event": event, "n": n, "hours_ago": len(hourly) - i})
    return {"width": width, "height": height, "bars": bars, "top": top}


def connector_rows(names: list[str], gauges, now: float, expiration: float) -> dict[str, dict]:
    """Per connector from the queue gauges: queued, deferred by code, the oldest deferred and its expiry."""
    out = {name: {"queued": 0, "held": 0, "active": 0, "deferred": 0, "deferred_by_code": {},
                  "oldest_deferred": None, "oldest_expires": None} for name in names}
    for connector, status, code, n, leased, oldest in gauges:
        row = out.setdefault(connector, {"queued": 0, "held": 0, "active": 0, "deferred": 0, "deferred_by_code": {},
                                         "oldest_deferred": None, "oldest_expires": None})
        row["active"] += leased
        if status == "deferred":
            row["deferred"] += n
            key = code or "-"
            row["deferred_by_code"][key] = row["deferred_by_code"].get(key, 0) + n
            if oldest is not None and (row["oldest_deferred"] is None or oldest < row["oldest_deferred"]):
                row["oldest_deferred"] = oldest
                row["oldest_expires"] = oldest + expiration
        elif status in row:
            row[status] += n
    return out


def ago(seconds: float) -> str:
    """A duration as people say it: 45s, 12m, 3h 5m, 2d 4h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


# -- the pages -------------------------------------------------------------------------------------

class Web:
    def __init__(self, console):
        self.console = console
        self.sessions = Sessions()
        self.history = FlowHistory(time.time())
        self._sampler: asyncio.Task | None = None
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("relaywatch.console", "templates"),
            autoescape=True,   # every template, whatever its name: remote text is the attacker's
            undefined=jinja2.ChainableUndefined, trim_blocks=True, lstrip_blocks=True)
        self.env.filters["iso"] = lambda t: iso(t) if isinstance(t, (int, float)) else (t or "—")
        self.env.filters["ago"] = ago
        self.env.globals["catalog"] = lambda kind: lookup(kind) if kind else None
        self.env.globals["connector_type"] = lambda name: getattr(self.app.config.connector(name), "type", None)
        self.env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)

    @property
    def app(self):
        return self.console.app

    @property
    def api(self):
        return self.console.api

    def start(self) -> None:
        self.history = FlowHistory(time.time(), self.counts())
        self._sampler = asyncio.get_running_loop().create_task(self._sample(), name="console history")

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)

    def counts(self) -> dict[tuple[str, str], int]:
        exported = metrics.read_export(self.app.config.server.data_dir) if self.app.child is not None else {}
        merged = dict(events.counts)
        for k, n in exported.items():
            merged[k] = merged.get(k, 0) + n
        return flow_counts(merged)

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(HISTORY_STEP)
            self.history.add(time.time(), self.counts())

    # -- dispatch ---------------------------------------------------------------------------

    async def handle(self, req: Request) -> Response:
        found = match(PAGES, "GET" if req.method == "HEAD" else req.method, req.path)
        now = time.time()
        session = self.sessions.read(req.headers.get("cookie"), now)
        tokens = self.console.config.tokens
        if tokens:
            # A session of a name no longer configured (a reload removed its token) is over.
            who = session.who if session is not None and session.who in {t.name for t in tokens} else None
        else:
            who = authenticate(None, req.peer, (), req.headers.get("host"))
            if session is not None and session.who != who:
                session = None
        new_cookie = None
        if who is not None and session is None:
            session, new_cookie = self.sessions.new(who, now)
        if not hasattr(found, "route"):
            if who is None:
                return self._to_login(req)
            return self.page(404, "error.html", session, message=f"No such page: {req.path}")
        route, params = found.route, found.params
        if who is None and not route.public:
            if not tokens:
                return Response(401, b"", content_type=None)
            return self._to_login(req)
        if req.method == "POST" and route.handler != "login":
            if session is None or not self.sessions.csrf_ok(session, form(req).get("csrf")):
                return self.page(403, "error.html", session,
                                 message="This form is out of date or did not come from this console "
                                         "(its CSRF token is missing or wrong). Reload the page and try again.")
        response = await getattr(self, route.handler)(req, params, session, who)
        if new_cookie is not None and route.handler not in ("static", "login"):
            response = replace(response, headers=(*response.headers, ("Set-Cookie", self._cookie(new_cookie))))
        return response

    def _cookie(self, value: str, max_age: int = SESSION_SECONDS) -> str:
        return cookie_header(value, secure=self.console.server is not None and
                             self.console.server.ssl_context is not None, max_age=max_age)

    def _to_login(self, req: Request) -> Response:
        target = req.path + ("?" + urllib.parse.urlencode(req.query, doseq=True) if req.query else "")
        return redirect("/login?" + urllib.parse.urlencode({"next": target}))

    def page(self, status: int, template: str, session: Session | None, **values) -> Response:
        values.setdefault("who", session.who if session else None)
        values["csrf"] = self.sessions.csrf(session) if session else ""
        values.setdefault("logins", bool(self.console.config.tokens))
        body = self.env.get_template(template).render(**values)
        return Response(status, body.encode(), content_type=HTML)

    async def call(self, handler: str, params: dict, who: str, query: dict | None = None,
                   body: dict | None = None) -> tuple[int, dict]:
        """An API handler in-process, as an HTTP client would call it: (status, JSON)."""
        route = next(r for r in API_ROUTES if r.handler == handler and
                     (handler != "queue_action" or r.segments[-1] == params.get("action")))
        raw = json.dumps(body).encode() if body is not None else b""
        req = Request(method=route.method, path=route.path, query={k: [v] for k, v in (query or {}).items()},
                      headers={"content-type": "application/json"}, body=raw, peer="127.0.0.1")
        try:
            response = await getattr(self.api, handler)(req, route, {k: v for k, v in params.items()
                                                                     if k != "action" or handler != "queue_action"},
                                                        who)
        except BadInput as exc:
            return exc.status, {"error": exc.message, "field": exc.field}
        return response.status, json.loads(response.body) if response.body else {}

    # -- handlers ------------------------------------------------------------------------------

    async def static(self, req, params, session, who) -> Response:
        name = params["name"]
        if name not in STATIC:
            return Response(404, b"not found", content_type="text/plain; charset=utf-8")
        data = resources.files("relaywatch.console").joinpath("static", name).read_bytes()
        return Response(200, data, content_type=STATIC[name],
                        headers=(("Cache-Control", "max-age=3600"),))

    async def login_form(self, req, params, session, who) -> Response:
        nxt = safe_next((req.query.get("next") or ["/"])[0])
        if who is not None:
            return redirect(nxt)
        return self.page(200, "login.html", None, next=nxt, error=None)

    async def login(self, req, params, session, who) -> Response:
        fields = form(req)
        nxt = safe_next(fields.get("next"))
        tokens = self.console.config.tokens
        name = token_name(fields.get("token", "").strip(), tokens) if tokens else who
        if name is None:
            return self.page(401, "login.html", None, next=nxt, error="That token is not one of the console's.")
        _, value = self.sessions.new(name, time.time())
        return redirect(nxt, cookie=self._cookie(value))

    async def logout(self, req, params, session, who) -> Response:
        self.sessions.ended.add(session.id)
        return redirect("/login" if self.console.config.tokens else "/", cookie=self._cookie("", max_age=0))

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
                page = QueryPage(status="deferred", connector=name, older_than=max(expiration - horizon, 0.0),
                                 limit=FORECAST_CAP + 1)
                row["expiring"] = len(await app.store.queue_page_ids(page, now))
        ordered = sorted(rows.values(), key=lambda r: (not r["incidents"], not r["deferred"], r["name"]))
        hourly = self.history.hourly(now, counts)
        return {"now": now, "connectors": ordered, "configured": names, "incidents": open_incidents, "horizon_hours": horizon / 3600,
                "forecast_cap": FORECAST_CAP, "chart": chart_svg_data(hourly),
                "totals": {e: sum(h[e] for h in hourly) for e in FLOW_EVENTS},
                "counting_since": self.history.started}

    async def overview(self, req, params, session, who) -> Response:
        return self.page(200, "overview.html", session, **await self.overview_values(who))

    async def overview_fragment(self, req, params, session, who) -> Response:
        return self.page(200, "overview_live.html", session, **await self.overview_values(who))

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
                             error="A reason is required: say why (it is kept in the audit log).")
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
            status, out = 400, {"error": "A reason is required: say why (it is kept in the audit log)."}
        else:
            status, out = await self.call("incident_undo", params, who, body={"reason": reason})
        _, inc = await self.call("incident_show", {"id": params["id"]}, who)
        if "id" not in inc:
            return self.page(404, "error.html", session, message=inc.get("error", "no such incident"))
        return self.page(status, "incident.html", session, inc=inc, plan=None,
                         result=out if status == 200 else None, error=None if status == 200 else out.get("error"))

    def queue_filter(self, req) -> dict[str, str]:
        return {k: v[0] for k, v in req.query.items() if k in (*BULK_FILTERS, "after") and v and v[0].strip()}

    async def queue(self, req, params, session, who) -> Response:
        filters = self.queue_filter(req)
        status, out = await self.call("queue_list", {}, who, query={**filters, "limit": "100"})
        error = out.get("error") if status != 200 else None
        return self.page(200 if status == 200 else status, "queue.html", session, filters=filters,
                         messages=out.get("messages", []), next_after=out.get("next_after"), error=error,
                         statuses=STATUSES, connectors=[c.name for c in self.app.config.connectors],
                         plan=None, result=None, actions=("retry", "hold", "release", "bounce", "delete"))

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
            error = "A reason is required: say why (it is kept in the audit log)."
        return self.page(200 if error is None else 400, "queue.html", session, filters=filters,
                         messages=listed.get("messages", []), next_after=listed.get("next_after"), error=error,
                         statuses=STATUSES, connectors=[c.name for c in self.app.config.connectors],
                         plan=out if error is None and not confirm else None, reason=reason, bulk_action=action,
                         result=out if error is None and confirm else None,
                         actions=("retry", "hold", "release", "bounce", "delete"))

    async def message(self, req, params, session, who) -> Response:
        status, msg = await self.call("queue_show", params, who)
        if status != 200:
            return self.page(status, "error.html", session, message=msg.get("error", "no such message"))
        return self.page(200, "message.html", session, msg=msg, result=None, error=None,
                         actions=("retry", "hold", "release", "bounce", "delete"))

    async def message_action(self, req, params, session, who) -> Response:
        reason = form(req).get("reason", "").strip()
        result, error = None, None
        if params["action"] not in ("retry", "hold", "release", "bounce", "delete"):
            error = f"unknown action {params['action']!r}"
        elif not reason:
            error = "A reason is required: say why (it is kept in the audit log)."
        else:
            status, out = await self.call("queue_action", params, who, body={"reason": reason})
            result, error = (out, None) if status == 200 else (None, out.get("error"))
        status, msg = await self.call("queue_show", {"id": params["id"]}, who)
        if status != 200:   # bounced or deleted: it left the queue
            return self.page(200 if result else 404, "error.html", session,
                             message=result["result"] if result else msg.get("error"))
        return self.page(200 if error is None else 400, "message.html", session, msg=msg, result=result,
                         error=error, actions=("retry", "hold", "release", "bounce", "delete"))

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

    async def audit(self, req, params, session, who) -> Response:
        _, out = await self.call("audit", {}, who, query={"limit": "200"})
        return self.page(200, "audit.html", session, audit=out["audit"])


def redirect(location: str, cookie: str | None = None) -> Response:
    headers = (("Location", location),) + ((("Set-Cookie", cookie),) if cookie else ())
    return Response(303, b"", content_type=None, headers=headers)
