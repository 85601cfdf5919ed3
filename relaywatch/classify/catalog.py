"""The catalog of delivery failures: what each code means and what to do.

The entries are data, one module per family: ``catalog_network`` (DNS, the
connection and TLS: the codes of Exchange Online's mail flow intelligence),
``catalog_replies`` (what the destination answered, local mailboxes,
relaywatch's own faults) and ``catalog_watch`` (the watch's warnings).  The
``CatalogEntry`` shape and its two audiences are in ``catalog_entry``.  Here they are
put together in one table, in that order, and looked up.

The other side, what relaywatch's own SMTP server refuses clients with, is
``catalog_client`` (``ClientReply``: its audiences are the client's admin and
the relay's); it has its own table, since no delivery is ever classified as one.
"""

from __future__ import annotations

from relaywatch.classify.catalog_client import CLIENT_REPLIES
from relaywatch.classify.catalog_entry import AUDIENCES, CatalogEntry, ClientReply
from relaywatch.classify.catalog_network import NETWORK
from relaywatch.classify.catalog_replies import REPLIES
from relaywatch.classify.catalog_watch import WARNINGS

__all__ = ["AUDIENCES", "CATALOG", "CLIENT_CATALOG", "CatalogEntry", "ClientReply", "lookup", "lookup_all", "lookup_client"]

CATALOG: dict[str, CatalogEntry] = {e.id: e for e in (*NETWORK, *REPLIES, *WARNINGS)}
CLIENT_CATALOG: dict[str, ClientReply] = {e.id: e for e in CLIENT_REPLIES}


def lookup(code_or_id: str) -> CatalogEntry | None:
    """Find an entry by id ("connect.refused") or code ("4.4.316")."""
    if code_or_id in CATALOG:
        return CATALOG[code_or_id]
    return next((e for e in CATALOG.values() if e.code == code_or_id), None)


def lookup_all(code_or_id: str) -> list[CatalogEntry]:
    """Every entry a user may mean: the one with that id, or all sharing that code
    (4.7.320 is a certificate failure, an MTA-STS policy failure and a DANE failure)."""
    if code_or_id in CATALOG:
        return [CATALOG[code_or_id]]
    return [e for e in CATALOG.values() if e.code == code_or_id]


def lookup_client(code_or_id: str) -> list[ClientReply]:
    """The replies to clients a user may mean: by id ("client.auth_failed"), enhanced
    code ("5.7.8"), reply code ("535") or both as the reply starts ("535 5.7.8")."""
    if code_or_id in CLIENT_CATALOG:
        return [CLIENT_CATALOG[code_or_id]]
    return [e for e in CLIENT_CATALOG.values()
            if code_or_id in (e.code, str(e.smtp_code), f"{e.smtp_code} {e.code}")]
