"""A browser's session with the console pages, pure: signed cookies, CSRF tokens, forms, redirects.

Without tokens, a loopback client gets in as "loopback"; with tokens, the
browser logs in once with a token (POST /login) and keeps a session cookie:
HttpOnly, SameSite=Strict, Secure over HTTPS, signed with a key made at start
(a restart logs out).  Every POST carries the session's CSRF token in a
hidden field, checked in constant time (console/web.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import urllib.parse
from dataclasses import dataclass

from relaywatch.console.http import Request, Response

COOKIE = "relaywatch_session"
SESSION_SECONDS = 12 * 3600


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


def redirect(location: str, cookie: str | None = None) -> Response:
    headers = (("Location", location),) + ((("Set-Cookie", cookie),) if cookie else ())
    return Response(303, b"", content_type=None, headers=headers)
