"""A catalog entry: what one failure code means and what to do, per audience.

Causes and fixes are written twice: for an ``on_premises`` connector (the admin
owns the destination) and for a ``partner`` connector or the internet (the
admin has to ask someone else).  ``for_both`` is for the entries whose words
are the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogEntry:
    id: str                       # stable dotted id shared by JSON, alerts and logs
    code: str                     # enhanced status code shown to users; the watch's warnings: "watch:<kind>"
    smtp_code: int | None         # None for the watch's warnings: no SMTP reply says them
    title: str
    explanation: str
    causes: dict[str, tuple[str, ...]]    # audience ("on_premises" | "partner") -> causes
    fixes: dict[str, tuple[str, ...]]
    permanent: bool = False

    def causes_for(self, connector_type: str | None) -> tuple[str, ...]:
        return self.causes["on_premises" if connector_type == "on_premises" else "partner"]

    def fixes_for(self, connector_type: str | None) -> tuple[str, ...]:
        return self.fixes["on_premises" if connector_type == "on_premises" else "partner"]


AUDIENCES = ("on_premises", "partner")


def for_both(*lines: str) -> dict[str, tuple[str, ...]]:
    """The same causes (or fixes) for every audience."""
    return {audience: lines for audience in AUDIENCES}


@dataclass(frozen=True)
class ClientReply:
    """A refusal relaywatch's own SMTP server sends to a client (catalog_client).

    Its two audiences are not connector types: ``client`` is what the admin of
    the sending client (an application, a device, a mail server) should do,
    ``relay`` what relaywatch's own admin can check."""
    id: str                       # "client.<what>", stable like CatalogEntry.id
    code: str                     # the enhanced status code of the replies
    smtp_code: int
    title: str
    replies: tuple[str, ...]      # the texts sent, "…" where they vary (a host, an address, a limit)
    when: str                     # when relaywatch sends them
    client: tuple[str, ...]
    relay: tuple[str, ...]

    @property
    def permanent(self) -> bool:
        return self.smtp_code >= 500
