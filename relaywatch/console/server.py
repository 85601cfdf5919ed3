"""The console inside ``relaywatch serve``: one listener for the API, /metrics and health.

Started by app.py in the receiving process (or the all-in-one one), after
the SMTP listener; stopped before it.  This module wires the parts: the h11
server (http.py) hands each request to ``dispatch``: a page goes to web.py;
for the rest it matches a route
(router.py), checks the token (auth.py) and calls the handler (api.py).
"""

from __future__ import annotations

import logging
import ssl
import time

from relaywatch import events
from relaywatch.config import format_hostport
from relaywatch.errors import StoreError
from relaywatch.console import health, metrics
from relaywatch.console.api import Api
from relaywatch.console.api_input import BadInput
from relaywatch.console.api_routes import ROUTES
from relaywatch.console.auth import authenticate, cross_site
from relaywatch.console.http import HttpServer, Request, Response, error_response, json_response
from relaywatch.console.openapi import document
from relaywatch.console.router import NoRoute, match
from relaywatch.console.web import Web, is_page

log = logging.getLogger("relaywatch.console")


class Console:
    def __init__(self, app):
        self.app = app
        self.api = Api(app, document(ROUTES), self.metrics_text)
        self.server: HttpServer | None = None
        self.last_queue_query_seconds: float | None = None
        self.web = Web(self)     # the pages (console/web.py), on the API's handlers

    @property
    def config(self):
        return self.app.config.http

    async def start(self) -> None:
        listen = self.config.listen
        if listen is None:
            return
        context = None
        if self.config.tls_cert and self.config.tls_key:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        self.server = HttpServer(self.dispatch, ssl_context=context)
        await self.server.start(*listen)
        self.web.start()
        log.info("console on %s://%s (API /api/v1, /metrics, /healthz, /readyz)",
                 "https" if context else "http", format_hostport(*self.address))

    @property
    def address(self) -> tuple[str, int] | None:
        return self.server.address if self.server is not None else None

    async def stop(self) -> None:
        await self.web.stop()
        await self.api.jobs.stop()   # a bulk action stops between messages; the audit log has what it was
        if self.server is not None:
            await self.server.stop()
            self.server = None

    async def dispatch(self, req: Request) -> Response:
        if is_page(req.path):
            return await self._page(req)
        # HEAD is GET without the body (http.py drops it): load balancers probe with it.
        found = match(ROUTES, "GET" if req.method == "HEAD" else req.method, req.path)
        public = not isinstance(found, NoRoute) and found.route.public
        who = "anonymous"
        if not public:
            # Before 404/405: without a good token nothing but 401 comes back.
            # Tokens are read from the running config each time: a reload (SIGHUP) changes them.
            who = authenticate(req.headers.get("authorization"), req.peer, self.config.tokens, req.headers.get("host"))
            if who is None:
                return Response(401, content_type=None, headers=(("WWW-Authenticate", 'Bearer realm="relaywatch"'),))
            if req.method == "POST" and cross_site(req.headers):
                return error_response(403, "a request from another site may not act here", "origin")
        if isinstance(found, NoRoute):
            if found.allowed:
                return Response(405, b'{"error":"method not allowed"}', headers=(("Allow", ", ".join(found.allowed)),))
            return error_response(404, f"no such page: {req.path}")
        route = found.route
        try:
            if route.handler == "healthz":
                return json_response(200, {"status": "ok"})
            if route.handler == "readyz":
                return json_response(*await self.readiness())
            if route.handler == "metrics":
                return Response(200, (await self.metrics_text()).encode(), content_type=metrics.CONTENT_TYPE)
            return await getattr(self.api, route.handler)(req, route, found.params, who)
        except BadInput as exc:
            return error_response(exc.status, exc.message, exc.field)
        except StoreError as exc:   # the queue store is down or refused: say so, no traceback
            log.warning("console %s %s: %s", req.method, req.path, exc)
            return error_response(503, f"the queue store could not answer: {exc}")

    async def _page(self, req: Request) -> Response:
        # The same-origin check as for the API, then the pages' own (session, CSRF: web.py).
        if req.method == "POST" and cross_site(req.headers):
            return error_response(403, "a request from another site may not act here", "origin")
        try:
            return await self.web.handle(req)
        except StoreError as exc:
            log.warning("console %s %s: %s", req.method, req.path, exc)
            return Response(503, f"The queue store could not answer: {exc}".encode(),
                            content_type="text/plain; charset=utf-8")

    async def readiness(self) -> tuple[int, dict]:
        return health.readiness({"drain": health.check_draining(self.app),
                                 "store": await health.check_store(self.app.store),
                                 "smtp": health.check_smtp(self.app),
                                 "delivery": health.check_delivery(self.app)})

    async def metrics_text(self) -> str:
        app = self.app
        now = time.time()
        started = time.perf_counter()
        rows = await app.store.queue_gauges(now)
        self.last_queue_query_seconds = time.perf_counter() - started
        connectors = [c.name for c in app.config.connectors] + ["local", "internet"]
        families = metrics.queue_families(rows, connectors, now)
        families.append(metrics.incident_family(await app.store.open_incidents()))
        # The delivery process's counts, when deliveries happen there (app.py, metrics.py).
        exported, exported_meters = (metrics.read_export_all(app.config.server.data_dir)
                                     if app.child is not None else ({}, {}))
        families += metrics.counter_families(dict(events.counts), exported)
        families += metrics.meter_families(metrics.local_meters(), exported_meters)
        families.append(metrics.Family("relaywatch_metrics_queue_query_seconds", "gauge",
                                       "How long this scrape's queue query took.",
                                       [({}, round(self.last_queue_query_seconds, 6))]))
        return metrics.render(families, metrics.node_name(app.config))
