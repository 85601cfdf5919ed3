"""Who may use the console: pure decisions, table-tested (tests/unit/test_console_units.py).

- No tokens configured: a client on a loopback address is let in (as
  "loopback"), any other client is not.  (config/http.py refuses a non-loopback
  ``http.listen`` without tokens, so that case only arises behind a proxy.)
- Tokens configured: every client needs ``Authorization: Bearer <token>``,
  loopback included.  Only SHA-256 digests of the tokens are in memory; the
  presented token's digest is compared with every one of them in constant
  time (no early exit), so timing tells neither the token nor which name.
- Without tokens the request must also name the console by a loopback host
  (``Host: 127.0.0.1:8025``, ``localhost``, ``[::1]``): a web page whose name
  an attacker points at 127.0.0.1 (DNS rebinding) reaches the socket, but not
  under such a name.
- A state-changing request a browser sends from another site is refused
  (``cross_site``): Sec-Fetch-Site, else Origin against Host.
- /metrics, /healthz, /readyz need no token (routes marked public).
"""

from __future__ import annotations

import hashlib
import hmac

from relaywatch.config import AdminToken, is_loopback

LOOPBACK_USER = "loopback"


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def token_name(token: str, tokens: tuple[AdminToken, ...]) -> str | None:
    digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
    found = None
    for t in tokens:
        if hmac.compare_digest(t.digest, digest):
            found = t.name
    return found


def host_name(host_header: str | None) -> str:
    """The host of a Host header, without the port (and brackets of an IPv6 literal)."""
    host = (host_header or "").strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def authenticate(authorization: str | None, peer: str, tokens: tuple[AdminToken, ...],
                 host: str | None = None) -> str | None:
    """The name to audit for this request, or None: 401."""
    if not tokens:
        return LOOPBACK_USER if is_loopback(peer) and is_loopback(host_name(host)) else None
    token = bearer_token(authorization)
    return token_name(token, tokens) if token is not None else None


def cross_site(headers: dict[str, str]) -> bool:
    """Did a browser send this from another origin?  (Clients other than browsers send neither header.)"""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site.strip().lower() not in ("same-origin", "none")
    origin = headers.get("origin")
    if origin is None:
        return False
    scheme, sep, rest = origin.strip().lower().partition("://")
    return not sep or rest.rstrip("/") != (headers.get("host") or "").strip().lower()
