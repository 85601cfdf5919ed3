"""Internationalised domain names and addresses (RFC 5890-5893, RFC 6531).

Pure.  relaywatch keeps, routes and looks up every domain as A-labels
(``xn--...``, IDNA2008); people are shown U-labels.  What a client typed goes
through the UTS #46 mapping first (``Παράδειγμα.TEST`` is ``παράδειγμα.test``),
as browsers and mail clients do for user input; what cannot be an IDNA2008
name is refused with the reason.  Local parts are never touched: RFC 6531
makes them opaque UTF-8 that only the destination may interpret.
"""

from __future__ import annotations

import re

import idna


class BadDomain(ValueError):
    """Not a valid IDNA2008 domain name; the message says why."""


def _is_ace(label: str) -> bool:
    return label[:4].lower() == "xn--"


def to_ascii(domain: str) -> str:
    """``domain`` (lower case, no trailing dot) as A-labels; raises BadDomain.

    ASCII labels other than ``xn--`` ones are left as they are: the RFC 5321
    syntax check has been made already, and IDNA would refuse names (``_dmarc``,
    a label of digits) that DNS and SMTP accept."""
    if domain.isascii() and not any(_is_ace(label) for label in domain.split(".")):
        return domain
    labels = []
    for label in domain.split("."):
        if label.isascii() and not _is_ace(label):
            labels.append(label)
            continue
        try:
            labels.append(idna.encode(label, uts46=True).decode("ascii"))
            if _is_ace(label):
                idna.decode(label)      # an A-label must decode to a valid U-label (RFC 5891 5.4)
        except (idna.IDNAError, UnicodeError) as exc:
            # ASCII only: the reason goes into an SMTP reply (U+2603 for a snowman).
            why = f"{label!r} is not a valid IDNA2008 label ({exc})"
            raise BadDomain(re.sub(r"[^\x20-\x7e]", lambda m: f"U+{ord(m.group()):04X}", why)) from None
    return ".".join(labels).lower()


def to_unicode(domain: str) -> str:
    """``domain`` with its A-labels shown as U-labels, for people; unchanged where it has none
    or where a label does not decode (then the A-label is the honest thing to show)."""
    if not any(_is_ace(label) for label in domain.split(".")):
        return domain
    out = []
    for label in domain.split("."):
        if _is_ace(label):
            try:
                label = idna.decode(label)
            except (idna.IDNAError, UnicodeError):
                pass
        out.append(label)
    return ".".join(out)


def domain_both_ways(domain: str) -> str:
    """An IDN as U-labels, with the A-labels DNS uses after it: ``παράδειγμα.test = xn--...test``
    (where a route's domain is shown: what people wrote and what was looked up)."""
    shown = to_unicode(domain)
    return shown if shown == domain else f"{shown} = {domain}"


def address_to_unicode(address: str) -> str:
    """``local@domain`` with the domain as U-labels (the local part as it is)."""
    local, at, domain = address.rpartition("@")
    return f"{local}@{to_unicode(domain)}" if at else address


def needs_smtputf8(*addresses: str) -> bool:
    """Whether an envelope with these (normalised, A-label) addresses can only be sent
    with SMTPUTF8: a non-ASCII local part has no ASCII form (RFC 6531 3.2)."""
    return not all(a.isascii() for a in addresses)
