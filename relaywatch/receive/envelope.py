"""The arguments of MAIL FROM and RCPT TO, pure: the path grammar, ESMTP parameters, allowed senders.

The conversation (receive/conversation.py) decides what a command means in
its state; this is how its argument reads: the mailbox of RFC 5321 4.1.2
(with RFC 6531's UTF-8), the ``KEY=value`` parameters of RFC 5321 4.1.1.11,
and whether an authenticated user may use a sender address.
"""

from __future__ import annotations

import re

from relaywatch import dsn_params
from relaywatch.dsn_params import ParameterError


def sender_allowed(senders: frozenset[str] | None, address: str) -> bool:
    """Whether an authenticated user may use ``address`` as MAIL FROM.

    ``senders`` holds addresses (``alice@contoso.test``) and domains
    (``@contoso.test``), lower-cased; None: any sender.  The null sender is
    allowed, as Postfix's reject_sender_login_mismatch does (bounces carry no
    owner)."""
    if senders is None or address == "":
        return True
    address = address.lower()
    domain = "@" + address.rpartition("@")[2] if "@" in address else None
    return address in senders or (domain is not None and domain in senders)


# A mailbox as RFC 5321 4.1.2 has it: a dot-string or quoted local part, and a
# domain name or address literal; an optional source route is ignored (4.1.1.3).
# RFC 6531 3.3 adds UTF-8 (any non-ASCII character) to atext, qtext and
# sub-domain (U-labels); whether a domain is a valid IDN is route.normalize's.
_U = "\u0080-\U0010ffff"
_LOCAL = rf"(?:[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~{_U}-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~{_U}-]+)*|\"(?:[\x20-\x21\x23-\x5b\x5d-\x7e{_U}]|\\[\x20-\x7e])*\")"
_DOMAIN = rf"(?:[A-Za-z0-9{_U}](?:[A-Za-z0-9{_U}-]*[A-Za-z0-9{_U}])?(?:\.[A-Za-z0-9{_U}](?:[A-Za-z0-9{_U}-]*[A-Za-z0-9{_U}])?)*\.?|\[[\x21-\x5a\x5e-\x7e]+\])"
_PATH = re.compile(rf"<(?:@[^:>]+:)?({_LOCAL}@{_DOMAIN}|{_LOCAL})>")
_BARE_PATH = re.compile(rf"({_LOCAL}@{_DOMAIN})(?=\s|$)")   # lenient: no angle brackets, as Postfix allows
# The MAIL FROM parameters we know (RFC 1870, 6152, 6531, 3461); AUTH too once it is offered (the conversation).
MAIL_PARAMS = {"SIZE", "BODY", "SMTPUTF8", *dsn_params.MAIL_PARAMS}
RCPT_PARAMS = dsn_params.RCPT_PARAMS      # (RFC 3461)


def parse_path(text: str) -> tuple[str | None, str]:
    """The address in ``<...>`` at the start of ``text`` and the rest; None if malformed.

    ``<>`` (the null sender) gives "".  Domain-less addresses (``<postmaster>``)
    come back as they are; the caller decides about them."""
    text = text.lstrip()
    if text.startswith("<>"):
        return "", text[2:]
    m = _PATH.match(text) or _BARE_PATH.match(text)
    if m is None:
        return None, text
    return m.group(1), text[m.end():]


def parse_params(text: str) -> dict[str, str] | None:
    """ESMTP parameters ``KEY=value KEY`` (keys upper-cased); None if malformed.

    A key given twice raises ``ParameterError`` with the reply: RFC 3461 4 says
    so for DSN's, and no extension allows it for its own."""
    params = {}
    for word in text.split():
        key, _, value = word.partition("=")
        if not key or not key.isascii() or not key.replace("-", "").isalnum():
            return None
        if key.upper() in params:
            raise ParameterError(f"501 5.5.4 Parameter {key.upper()[:32]} given twice")
        params[key.upper()] = value
    return params
