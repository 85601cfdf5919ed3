"""The console's routes as data, and matching a request to one (pure).

The same table drives dispatch (console/server.py) and the OpenAPI document
(console/openapi.py), so the document cannot miss a route; a test checks it.
Paths are OpenAPI templates: ``/api/v1/queue/{id}`` matches one segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Param:
    name: str
    where: str                          # "path" or "query"
    schema: dict[str, Any]
    description: str
    required: bool = False


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: str                        # the name of the handler method (console/api.py Api)
    summary: str
    public: bool = False                # no token needed (metrics, health)
    params: tuple[Param, ...] = ()
    body: dict[str, Any] | None = None  # JSON schema of the request body
    response: str | None = None         # components/schemas name of the 200 body
    content_type: str = "application/json"
    errors: tuple[int, ...] = ()        # error statuses it may answer besides 401

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.strip("/").split("/"))


@dataclass(frozen=True)
class Match:
    route: Route
    params: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NoRoute:
    allowed: tuple[str, ...] = ()       # methods the path has: 405 if any, else 404


def match(routes: tuple[Route, ...], method: str, path: str) -> Match | NoRoute:
    parts = tuple(path.strip("/").split("/")) if path.strip("/") else ("",)
    allowed = []
    for route in routes:
        params = _bind(route.segments, parts)
        if params is None:
            continue
        if route.method == method:
            return Match(route, params)
        allowed.append(route.method)
    return NoRoute(tuple(dict.fromkeys(allowed)))


def _bind(template: tuple[str, ...], parts: tuple[str, ...]) -> dict[str, str] | None:
    if len(template) != len(parts):
        return None
    params = {}
    for t, p in zip(template, parts):
        if t.startswith("{") and t.endswith("}"):
            if not p:
                return None
            params[t[1:-1]] = p
        elif t != p:
            return None
    return params
