"""MTA-STS (RFC 8461), the pure part: a policy's TXT record and body parsed, MX hosts
matched against it, and what a failed session under it is (table-tested).

- ``parse_txt``: the policy id of the ``_mta-sts`` TXT record.
- ``parse_policy``: the policy body (``StsPolicy``), or ``PolicyInvalid`` naming the fault.
- ``mx_matches`` / ``StsPolicy.allows``: which MX hosts a policy lets receive mail.
- ``is_violation``, ``result_type``, ``mx_mismatch``: whether a session failure breaks the
  policy, and the RFC 8460 result type it is reported under.

Fetching and caching the policies is deliver/mta_sts.py's; applying them to targets and
sessions deliver/smtp.py's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relaywatch.classify.observation import Observation, Outcome, Phase
from relaywatch.tls_results import (CERTIFICATE_EXPIRED, CERTIFICATE_HOST_MISMATCH, CERTIFICATE_NOT_TRUSTED,
                                    STARTTLS_NOT_SUPPORTED, VALIDATION_FAILURE)

MAX_AGE_LIMIT = 31557600              # RFC 8461 3.2: one year
MODES = ("enforce", "testing", "none")

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")

# OpenSSL X509_V_ERR_* codes -> RFC 8460 result type (as classify.VERIFY_SUBTYPES, the code decides).
_VERIFY_RESULT = {
    62: CERTIFICATE_HOST_MISMATCH, 64: CERTIFICATE_HOST_MISMATCH,
    10: CERTIFICATE_EXPIRED, 14: CERTIFICATE_EXPIRED,
    2: CERTIFICATE_NOT_TRUSTED, 18: CERTIFICATE_NOT_TRUSTED, 19: CERTIFICATE_NOT_TRUSTED,
    20: CERTIFICATE_NOT_TRUSTED, 21: CERTIFICATE_NOT_TRUSTED,
}

# What a policy in force turns into an STS violation; anything else (refused,
# timeout, a 4xx to MAIL) is the destination's own failure, classified as usual.
STS_OUTCOMES = (Outcome.TLS_NOT_OFFERED, Outcome.TLS_HANDSHAKE, Outcome.CERTIFICATE, Outcome.STS_MX_MISMATCH)


class PolicyInvalid(ValueError):
    """A policy body that is not a valid STSv1 policy (the reason says what)."""


def parse_txt(texts: list[str]) -> str | None:
    """The policy id of the ``_mta-sts`` TXT strings, or None (no usable record).

    RFC 8461 3.1: only records starting ``v=STSv1``; more than one such
    record, or one without a valid ``id``, means no policy."""
    records = [t for t in texts if re.match(r"v=STSv1\s*(;|$)", t)]
    if len(records) != 1:
        return None
    fields_ = {}
    for part in records[0].split(";"):
        key, eq, value = part.strip().partition("=")
        if eq:
            fields_.setdefault(key.strip(), value.strip())
    policy_id = fields_.get("id", "")
    return policy_id if _ID.fullmatch(policy_id) else None


@dataclass(frozen=True)
class StsPolicy:
    domain: str
    id: str
    mode: str                  # enforce | testing | none
    mx: tuple[str, ...]
    max_age: int
    fetched_at: float
    text: str = ""             # the body as served: RFC 8460's policy-string is its lines

    def expired(self, now: float) -> bool:
        return now >= self.fetched_at + self.max_age

    def allows(self, host: str) -> bool:
        return any(mx_matches(pattern, host) for pattern in self.mx)

    def evidence(self) -> dict:
        """What a failure under this policy shows (and TLS-RPT reports)."""
        return {"policy_domain": self.domain, "policy_type": "sts", "policy_id": self.id, "mode": self.mode,
                "mx": list(self.mx), "max_age": self.max_age}

    def policy_strings(self) -> list[str]:
        return [line.strip() for line in self.text.splitlines() if line.strip()]


def parse_policy(text: str, domain: str, policy_id: str, fetched_at: float) -> StsPolicy:
    """An STSv1 policy body (RFC 8461 3.2); raises PolicyInvalid naming the fault.

    ``key: value`` lines (CRLF or LF); unknown keys are ignored, as the RFC
    asks, so a later extension does not invalidate a policy."""
    values: dict[str, str] = {}
    mx: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyInvalid(f"line {n} is not \"key: value\"")
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            values.setdefault(key, value)
    if values.get("version") != "STSv1":
        raise PolicyInvalid(f"version is {values.get('version')!r}, not 'STSv1'")
    mode = values.get("mode")
    if mode not in MODES:
        raise PolicyInvalid(f"mode is {mode!r}, not one of enforce, testing, none")
    max_age = values.get("max_age", "")
    if not max_age.isdigit() or len(max_age) > 10:
        raise PolicyInvalid(f"max_age is {max_age!r}, not a number of seconds")
    if mode != "none" and not mx:
        raise PolicyInvalid(f"mode {mode} without any mx line")
    for pattern in mx:
        if not _valid_pattern(pattern):
            raise PolicyInvalid(f"mx {pattern!r} is not a host name or *.domain pattern")
    return StsPolicy(domain=domain, id=policy_id, mode=mode, mx=tuple(mx),
                     max_age=min(int(max_age), MAX_AGE_LIMIT), fetched_at=fetched_at, text=text)


def _valid_pattern(pattern: str) -> bool:
    labels = pattern[2:].split(".") if pattern.startswith("*.") else pattern.split(".")
    return len(labels) >= 2 and all(_LABEL.fullmatch(label) for label in labels)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: exact, or ``*.example.com`` matching exactly one more label
    (``mx1.example.com``, not ``example.com`` nor ``a.b.example.com``)."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return pattern == host


def result_type(obs: Observation) -> str:
    """The RFC 8460 result type a failed session under a policy is reported as."""
    if obs.outcome is Outcome.TLS_NOT_OFFERED or (obs.outcome is Outcome.REPLY and obs.phase is Phase.STARTTLS):
        return STARTTLS_NOT_SUPPORTED
    if obs.outcome is Outcome.CERTIFICATE:
        return _VERIFY_RESULT.get((obs.tls or {}).get("verify_code"), VALIDATION_FAILURE)
    return VALIDATION_FAILURE


def is_violation(obs: Observation) -> bool:
    """Whether a session failure breaks a policy (not merely fails the destination)."""
    return obs.outcome in STS_OUTCOMES or (obs.outcome is Outcome.REPLY and obs.phase is Phase.STARTTLS)


def mx_mismatch(policy: StsPolicy, destination) -> Observation:
    """The observation for an MX host the policy does not list: it is never connected to."""
    return Observation(Phase.DNS, Outcome.STS_MX_MISMATCH, destination,
                       sts={**policy.evidence(), "mx_host": destination.host, "result_type": VALIDATION_FAILURE})
