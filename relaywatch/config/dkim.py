"""``[[dkim]]``: which From domains are signed with which key; the key files are loaded here."""

from __future__ import annotations

import re
from pathlib import Path

from relaywatch.config.dkim_key import ALGORITHMS, KeyProblem, load_key
from relaywatch.config.model import DkimSigning
from relaywatch.config.values import Reader, boolean, choice, parse_domain, parse_selector, string_list

CANONICALIZATIONS = ("relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple")

# RFC 6376 §5.4.1's list, as OpenDKIM's default SignHeaders, with List-Unsubscribe-Post (RFC 8058).
DEFAULT_HEADERS = (
    "from", "reply-to", "subject", "date", "to", "cc", "message-id", "in-reply-to", "references",
    "mime-version", "content-type", "content-transfer-encoding", "content-id", "content-description",
    "sender", "resent-date", "resent-from", "resent-sender", "resent-to", "resent-cc", "resent-message-id",
    "list-id", "list-help", "list-unsubscribe", "list-unsubscribe-post", "list-subscribe", "list-post",
    "list-owner", "list-archive",
)
# Signed one more time than they occur (RFC 6376 §8.15), so another instance cannot be added.
DEFAULT_OVERSIGN = ("from",)
# Changed or added in transit (RFC 6376 §5.4.1): signing them breaks signatures.
NEVER_SIGNED = ("return-path", "received", "comments", "keywords", "bcc", "resent-bcc", "dkim-signature")
FIELD_NAME = re.compile(r"[!-9;-~]+")


def parse_dkim(r: Reader, raw: dict, rel) -> tuple[DkimSigning, ...]:
    """``[[dkim]]`` entries, their key files loaded (an unusable key is an error naming the file)."""
    problems = r.problems

    def header_names(v):
        names = [h.lower() for h in string_list(v)]
        for h in names:
            if not FIELD_NAME.fullmatch(h):
                raise ValueError(f"{h!r} is not a header field name")
            if h in NEVER_SIGNED:
                raise ValueError(f"{h!r} must not be signed: it is added or changed on the way (RFC 6376 5.4.1)")
        return tuple(dict.fromkeys(names))

    out: list[DkimSigning] = []
    for _, p, item in r.entries(raw, "dkim", DkimSigning, required=("domain", "selector", "key_file"),
                                not_in_file=("key",)):
        domain = r.get(item, "domain", p, parse_domain, None)
        if domain and domain.startswith("*."):
            problems.append(f"{p}.domain: {domain!r}: write the domain itself and set sub_domains = true")
            domain = None
        selector = r.get(item, "selector", p, parse_selector, None)
        key_file = r.get(item, "key_file", p, rel, None)
        algorithm = r.get(item, "algorithm", p, choice(ALGORITHMS), "")
        headers = r.get(item, "headers", p, header_names, DEFAULT_HEADERS)
        if "from" not in headers:
            problems.append(f"{p}.headers: must include \"from\" (RFC 6376 5.4: From is always signed)")
        key = None
        if key_file is not None:
            try:
                key = load_key(key_file)
            except KeyProblem as exc:
                problems.append(f"{p}.key_file: {exc}")
        if key is not None and algorithm and algorithm != key.algorithm:
            problems.append(f"{p}.algorithm: {algorithm!r}, but {key_file} is a key for {key.algorithm}; "
                            f"remove algorithm (it follows the key) or name the right key_file")
        entry = DkimSigning(
            domain=domain or "", selector=selector or "", key_file=key_file or Path(),
            algorithm=key.algorithm if key else algorithm,
            sub_domains=r.get(item, "sub_domains", p, boolean, False),
            headers=headers,
            oversign_headers=r.get(item, "oversign_headers", p, header_names, DEFAULT_OVERSIGN),
            canonicalization=r.get(item, "canonicalization", p, choice(CANONICALIZATIONS),
                                   DkimSigning.canonicalization),
            key=key)
        if domain and selector and any(o.domain == domain and o.selector == selector for o in out):
            problems.append(f"{p}.selector: {domain} already has an entry with selector {selector!r}")
        out.append(entry)
    return tuple(out)
