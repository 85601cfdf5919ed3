"""The mail flow console: HTTP API, Prometheus metrics and health checks on their own listener.

    server.py   the Console app.py starts: wires the parts, dispatches requests
    http.py     HTTP/1.1 on h11 (sans-I/O) over asyncio streams; limits, security headers
    router.py   the route table's matching (pure)
    auth.py     who may use it: loopback, bearer tokens (pure)
    api.py      /api/v1 handlers: the CLI's JSON (views.py), actions (actions.py)
    metrics.py  /metrics rendering (pure) and the delivery process's counter export
    health.py   /healthz, /readyz
    openapi.py  /api/v1/openapi.json from the route table
    web.py      the web pages (templates/, static/): dispatch, sessions, CSRF, rendering
    pages.py    the pages' handlers, one class per page family, built from the API handlers
    overview.py the overview's numbers (pure): flow history, chart, connector rows
    web_session.py  the browser's session cookie, CSRF token, forms, redirects (pure)
"""
