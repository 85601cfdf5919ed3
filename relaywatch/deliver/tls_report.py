"""TLS reporting (RFC 8460), the delivery side: every TLS result recorded in one place.

Whatever decides a session's TLS (MTA-STS in deliver/mta_sts.py, DANE, or
plain opportunistic TLS on the MX route, in deliver/smtp.py) makes a
``TlsResult`` (tls_results.py) and calls ``TlsResults.record``.  That keeps the
latest results in memory (tests and the log read them) and hands each to the
listeners; the one that matters is ``TlsTally``.

``TlsTally`` counts results per UTC day and report key (policy domain,
policy, result type, MX, addresses) in memory; the watch's tick takes the
counts (``take``) and adds them to the store in one write, so delivery never
waits for the store and the store sees one row per key per tick, not one per
session.  What a crash loses is at most one tick of counts: statistics, not
mail.  The daily report is built from the stored counts (watch/tls_report.py).
"""

from __future__ import annotations

import collections
from datetime import datetime, timezone
from typing import Callable, Iterable

from relaywatch.classify.observation import Observation, Outcome
from relaywatch.tls_results import STARTTLS_NOT_SUPPORTED, VALIDATION_FAILURE, TlsCount, TlsResult

RESULTS_KEPT = 10_000


def utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d")


class TlsResults:
    """The one recording call of the delivery side, and the recent results."""

    def __init__(self) -> None:
        self.recent: collections.deque[TlsResult] = collections.deque(maxlen=RESULTS_KEPT)
        self.listeners: list[Callable[[TlsResult], None]] = []

    def record(self, result: TlsResult) -> None:
        self.recent.append(result)
        for listener in self.listeners:
            listener(result)


class TlsTally:
    """Counts of results by (day, report key), taken by the watch and added to the store.

    ``add`` is on the delivery path: a tuple and a dict increment (about a
    microsecond); the TlsCount rows are made only when the watch takes them."""

    def __init__(self) -> None:
        self._counts: dict[tuple, int] = {}      # TlsCount's key fields -> count
        self._details: dict[tuple, str] = {}     # the same key -> the latest failure's detail
        self._day = (-1, "")                     # (day number, its name): one strftime a day

    def add(self, result: TlsResult) -> None:
        number = int(result.at // 86400)
        if number != self._day[0]:
            self._day = (number, utc_day(result.at))
        if result.result_type is None:
            key = (self._day[1], result.policy_domain, result.policy_type, result.policy_strings, "", "", "", "")
        else:
            key = (self._day[1], result.policy_domain, result.policy_type, result.policy_strings,
                   result.result_type, result.mx_host or "", result.receiving_ip or "", result.sending_ip or "")
            self._details[key] = result.detail
        self._counts[key] = self._counts.get(key, 0) + 1

    def put_back(self, rows: Iterable[TlsCount]) -> None:
        """Count ``rows`` again (a store write that failed gives its rows back)."""
        for r in rows:
            key = (r.day, r.policy_domain, r.policy_type, r.policy_strings, r.result_type, r.mx_host,
                   r.receiving_ip, r.sending_ip)
            self._counts[key] = self._counts.get(key, 0) + r.count
            if r.detail:
                self._details.setdefault(key, r.detail)    # a detail counted since is newer

    @property
    def pending(self) -> int:
        """Sessions counted and not taken yet."""
        return sum(self._counts.values())

    def take(self) -> list[TlsCount]:
        counts, self._counts = self._counts, {}
        details, self._details = self._details, {}
        return [TlsCount(*key, count=n, detail=details.get(key, "")) for key, n in counts.items()]


def opportunistic_result(domain: str, host: str, ip: str | None, sending_ip: str | None, encrypted: bool,
                         failure: Observation | None, at: float) -> TlsResult | None:
    """A session by MX under no policy ("no-policy-found"): a success when it was
    encrypted, ``starttls-not-supported`` when the MX offered no STARTTLS (the mail
    went in clear), ``validation-failure`` when the handshake failed; None when the
    session failed before TLS (refused, timed out: not a TLS result)."""
    if failure is None:
        kind = None if encrypted else STARTTLS_NOT_SUPPORTED
    elif failure.outcome in (Outcome.TLS_HANDSHAKE, Outcome.CERTIFICATE):
        kind = VALIDATION_FAILURE
    else:
        return None
    return TlsResult(at=at, policy_domain=domain, policy_type="no-policy-found", policy_id=None, mode=None,
                     result_type=kind, mx_host=host, receiving_ip=ip, sending_ip=sending_ip,
                     detail=f"opportunistic TLS to {host}: {kind or 'encrypted'}")
