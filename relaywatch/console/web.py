"""The console's web pages: server-rendered HTML (Jinja2), one CSS file, one small JS file.

This module dispatches and renders; the handlers are console/pages.py (one
class per page family), the overview's numbers console/overview.py, the
browser's session console/web_session.py.

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
import json
import time
import urllib.parse
from dataclasses import replace
from importlib import resources

import jinja2

from relaywatch import events
from relaywatch.classify.catalog import lookup
from relaywatch.idn import address_to_unicode, domain_both_ways
from relaywatch.model import iso

from relaywatch.console import metrics
from relaywatch.console.api_input import BadInput
from relaywatch.console.api_routes import ROUTES as API_ROUTES
from relaywatch.console.auth import authenticate, token_name
from relaywatch.console.http import Request, Response
from relaywatch.console.overview import HISTORY_STEP, FlowHistory, ago, flow_counts
from relaywatch.console.pages import (AuditPages, ConnectorPages, IncidentPages, NodePages, OverviewPages, QueuePages,
                                      TlsReportPages, TracePages, notified_to)
from relaywatch.console.router import Route, match
from relaywatch.console.web_session import SESSION_SECONDS, Session, Sessions, cookie_header, form, redirect, safe_next

HTML = "text/html; charset=utf-8"
STATIC = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}

PAGES = (
    Route("GET", "/", "overview", "Overview"),
    Route("GET", "/fragments/overview", "overview_fragment", "The overview's live part"),
    Route("GET", "/events/overview", "overview_events", "The overview's live part as server-sent events"),
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
    Route("GET", "/trace", "trace_page", "The message trace, by queue id or Message-ID"),
    Route("GET", "/nodes", "nodes_page", "The nodes sharing the queue"),
    Route("GET", "/tls-reports", "tls_reports_page", "TLS reporting: a day's sessions per policy domain"),
)


def is_page(path: str) -> bool:
    """Is this a console page (this module) rather than the API, metrics or health?"""
    return not path.startswith("/api/") and path not in ("/metrics", "/healthz", "/readyz")


class Web(OverviewPages, IncidentPages, QueuePages, ConnectorPages, AuditPages, TracePages, NodePages,
          TlsReportPages):
    """Dispatch (sessions, CSRF, login), rendering, and the API called in-process; the pages are its bases."""

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
        # IDNs as people write them (U-labels); the JSON and the links keep what is stored (A-labels).
        self.env.filters["address"] = lambda a: address_to_unicode(a) if a else a
        self.env.filters["domain"] = lambda d: domain_both_ways(d) if d else d
        self.env.globals["catalog"] = lambda kind: lookup(kind) if kind else None
        self.env.globals["connector_type"] = lambda name: getattr(self.app.config.connector(name), "type", None)
        self.env.globals["notified_to"] = lambda channel: notified_to(self.app.config, channel)
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

    def still_allowed(self, req: Request, who: str) -> bool:
        """May ``who`` still see what ``req`` asked for (a stream, long after it began)?  Not
        once its session is over: logged out, expired, or its token removed by a reload."""
        tokens = self.console.config.tokens
        if not tokens:
            return True
        session = self.sessions.read(req.headers.get("cookie"), time.time())
        return session is not None and session.who == who and who in {t.name for t in tokens}

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
