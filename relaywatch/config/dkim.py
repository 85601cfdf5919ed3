"""``[[dkim]]``: which From domains are signed with which key; the key files are loaded here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from relaywatch.config.model import DkimSigning
from relaywatch.config.values import Reader, boolean, choice, file_keys, parse_domain, parse_selector, string_list


def parse_dkim(r: Reader, raw_dkim: Any, rel) -> tuple[DkimSigning, ...]:
    """``[[dkim]]`` entries, their key files loaded (an unusable key is an error naming the file)."""
    problems = r.problems
    if raw_dkim == []:
        return ()   # nothing to sign: receive/dkim.py (and cryptography) is never imported
    from relaywatch.receive import dkim as signing
    if not isinstance(raw_dkim, list):
        problems.append("dkim: must be an array of tables ([[dkim]])")
        return ()

    def header_names(v):
        names = [h.lower() for h in string_list(v)]
        for h in names:
            if not signing.FIELD_NAME.fullmatch(h):
                raise ValueError(f"{h!r} is not a header field name")
            if h in signing.NEVER_SIGNED:
                raise ValueError(f"{h!r} must not be signed: it is added or changed on the way (RFC 6376 5.4.1)")
        return tuple(dict.fromkeys(names))

    out: list[DkimSigning] = []
    for i, item in enumerate(raw_dkim):
        p = f"dkim[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{p}: must be a table")
            continue
        r.unknown(item, file_keys(DkimSigning, not_in_file=("key",)), p)
        for required in ("domain", "selector", "key_file"):
            if required not in item:
                problems.append(f"{p}.{required}: missing")
        domain = r.get(item, "domain", p, parse_domain, None)
        if domain and domain.startswith("*."):
            problems.append(f"{p}.domain: {domain!r}: write the domain itself and set sub_domains = true")
            domain = None
        selector = r.get(item, "selector", p, parse_selector, None)
        key_file = r.get(item, "key_file", p, rel, None)
        algorithm = r.get(item, "algorithm", p, choice(signing.ALGORITHMS), "")
        headers = r.get(item, "headers", p, header_names, signing.DEFAULT_HEADERS)
        if "from" not in headers:
            problems.append(f"{p}.headers: must include \"from\" (RFC 6376 5.4: From is always signed)")
        key = None
        if key_file is not None:
            try:
                key = signing.load_key(key_file)
            except signing.KeyProblem as exc:
                problems.append(f"{p}.key_file: {exc}")
        if key is not None and algorithm and algorithm != key.algorithm:
            problems.append(f"{p}.algorithm: {algorithm!r}, but {key_file} is a key for {key.algorithm}; "
                            f"remove algorithm (it follows the key) or name the right key_file")
        entry = DkimSigning(
            domain=domain or "", selector=selector or "", key_file=key_file or Path(),
            algorithm=key.algorithm if key else algorithm,
            sub_domains=r.get(item, "sub_domains", p, boolean, False),
            headers=headers,
            oversign_headers=r.get(item, "oversign_headers", p, header_names, signing.DEFAULT_OVERSIGN),
            canonicalization=r.get(item, "canonicalization", p, choice(signing.CANONICALIZATIONS),
                                   DkimSigning.canonicalization),
            key=key)
        if domain and selector and any(o.domain == domain and o.selector == selector for o in out):
            problems.append(f"{p}.selector: {domain} already has an entry with selector {selector!r}")
        out.append(entry)
    return tuple(out)
