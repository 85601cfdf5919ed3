"""``[http]``: the console's listener, its TLS pair and the admin tokens (kept only as hashes)."""

from __future__ import annotations

import hashlib
import re

from relaywatch.config.model import AdminToken, HttpConfig, ServerConfig
from relaywatch.config.pem import key_pair_problems
from relaywatch.config.values import Reader, file_keys, format_hostport, is_loopback, parse_hostport, string

TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
MIN_TOKEN_LENGTH = 16
# "name:sha256:<64 hex digits>": the token's SHA-256, so a token file need not hold the token itself
# (``relaywatch token new NAME`` prints a fresh token and this line).
_HASHED = re.compile(r"sha256:([0-9a-fA-F]{64})")


def hashed_line(name: str, token: str) -> str:
    """The http.tokens line that holds ``token`` only as its SHA-256."""
    return f"{name}:sha256:{hashlib.sha256(token.encode()).hexdigest()}"


def parse_http(r: Reader, h: dict, rel, server: ServerConfig) -> HttpConfig:
    """[http]: the console's listener.  Tokens are hashed here; only the hashes are kept."""
    problems = r.problems
    d = HttpConfig()
    r.unknown(h, file_keys(HttpConfig), "http")

    def listen(v):
        if v == "off":
            return None
        host, port = parse_hostport(string(v), 8025, allow_zero=True)
        if (host, port) in server.listen and port != 0:
            raise ValueError(f"{format_hostport(host, port)} is also in server.listen (the SMTP port)")
        return host, port
    address = r.get(h, "listen", "http", listen, d.listen)
    tokens = _http_tokens(h, rel, problems) if "tokens" in h else ()
    tls_cert = r.get(h, "tls_cert", "http", rel, None)
    tls_key = r.get(h, "tls_key", "http", rel, None)
    if (tls_cert is None) != (tls_key is None):
        problems.append("http.tls_key: tls_cert and tls_key must be set together")
    elif tls_cert is not None:
        missing = [f"http.{k}: file {v} does not exist" for k, v in (("tls_cert", tls_cert), ("tls_key", tls_key))
                   if not v.is_file()]
        problems += missing or key_pair_problems(tls_cert, tls_key, "http")
    if address is not None and not tokens and not is_loopback(address[0]) and "tokens" not in h:
        # Without tokens only loopback clients get in (console/auth.py): on any
        # other address the console would answer 401 to everyone.
        problems.append(f"http.tokens: needed, since http.listen ({format_hostport(*address)}) is not a loopback "
                        f"address and only loopback clients may use the console without a token")
    return HttpConfig(listen=address, tokens=tokens, tls_cert=tls_cert, tls_key=tls_key)


def _http_tokens(h: dict, rel, problems: list[str]) -> tuple[AdminToken, ...]:
    """``tokens``: a list of "name:token" strings, or the path of a file with one
    "name:token" a line (blank lines and # comments skipped); a token written
    ``sha256:<64 hex digits>`` is the token's SHA-256 (hashed at rest)."""
    value = h["tokens"]
    if isinstance(value, str):
        try:
            path = rel(value)
            text = path.read_text(encoding="utf-8")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            problems.append(f"http.tokens: cannot read the token file {value}: {reason}")
            return ()
        lines = [(f"http.tokens ({path}:{n})", line.strip()) for n, line in enumerate(text.splitlines(), 1)
                 if line.strip() and not line.strip().startswith("#")]
        if not lines:
            problems.append(f"http.tokens: the token file {path} holds no \"name:token\" line")
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        lines = [(f"http.tokens[{i}]", v.strip()) for i, v in enumerate(value)]
    else:
        problems.append("http.tokens: must be a list of \"name:token\" strings or the path of a file of them")
        return ()
    out: list[AdminToken] = []
    for where, line in lines:
        name, sep, token = line.partition(":")
        name, token = name.strip(), token.strip()
        # Problems never quote the token itself: config check output ends up in tickets.
        if not sep or not name or not token:
            problems.append(f"{where}: must be \"name:token\" (the name is who acts, in the audit log)")
        elif not TOKEN_NAME.fullmatch(name):
            problems.append(f"{where}: the name {name!r} may only have letters, digits and _ . @ - (at most 64)")
        elif (hashed := _HASHED.fullmatch(token)) is None and (
                len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token)):
            problems.append(f"{where}: the token of {name} is too weak: use at least {MIN_TOKEN_LENGTH} characters "
                            f"without spaces (e.g. from `openssl rand -hex 24`)")
        elif any(t.name == name for t in out):
            problems.append(f"{where}: the name {name} is given twice")
        else:
            digest = bytes.fromhex(hashed.group(1)) if hashed else hashlib.sha256(token.encode()).digest()
            if any(t.digest == digest for t in out):
                problems.append(f"{where}: the token of {name} is also another name's token")
            else:
                out.append(AdminToken(name, digest))
    return tuple(out)
