"""DKIM keys for the admin: ``relaywatch dkim keygen``, the DNS record to publish, and the
warnings ``config check`` prints about keys that work but should not be used.

Loading a key and what ``[[dkim]]`` may say are config's (config/dkim_key.py,
config/dkim.py), so that ``config check`` validates them without importing the
receiving side; the signer applied to a message is receive/dkim_sign.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable

from relaywatch.config.dkim_key import ED25519_SHA256, GOOD_RSA_BITS, RSA_SHA256, KeyProblem, generate_key


def txt_strings(record: str) -> list[str]:
    """``record`` as the character-strings of a TXT record, 255 octets at most each (RFC 1035 §3.3)."""
    return [record[i:i + 255] for i in range(0, len(record), 255)] or [""]


def loose_key_warnings(signings: Iterable) -> list[str]:
    """Valid, but worth telling the admin (config check prints these)."""
    out = []
    for i, s in enumerate(signings):
        if s.key.algorithm == RSA_SHA256 and s.key.bits < GOOD_RSA_BITS:
            out.append(f"dkim[{i}].key_file: {s.key_file} is a {s.key.bits}-bit RSA key; use {GOOD_RSA_BITS} bits "
                       f"(RFC 8301), e.g. relaywatch dkim keygen {s.domain} --bits {GOOD_RSA_BITS}")
        if s.key.loose_permissions:
            out.append(f"dkim[{i}].key_file: {s.key_file} can be read by any user on this machine; "
                       f"chmod 600 it (anyone with the key can sign as {s.domain})")
    return out


def write_key_file(path: Path, pem: bytes) -> None:
    """Create ``path`` with mode 0600 (never replacing a file that exists)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


# -- relaywatch dkim keygen ------------------------------------------------------------------

def default_selector(algorithm: str, today: time.struct_time | None = None) -> str:
    """``rsa-202612`` / ``ed25519-202612``: a new selector per key makes rotation a DNS addition."""
    today = today or time.gmtime()
    return f"{algorithm.split('-')[0]}-{today.tm_year:04d}{today.tm_mon:02d}"


def keygen(domain: str, selector: str, algorithm: str, bits: int, out_dir: Path) -> str:
    """Write a new private key (mode 0600) to ``out_dir`` and return what to publish and configure.

    Raises KeyProblem for a file that exists already or a directory that cannot take it."""
    path = (out_dir / f"{domain}.{selector}.key").absolute()
    pem, key = generate_key(algorithm, bits)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_key_file(path, pem)
    except FileExistsError:
        raise KeyProblem(f"{path} exists already; choose another --selector (a new key needs a new "
                         f"selector, so that mail signed with the old one still verifies)") from None
    except OSError as exc:
        raise KeyProblem(f"cannot write {path}: {exc.strerror}") from None
    strings = " ".join(f'"{s}"' for s in txt_strings(key.public_record()))
    size = "" if algorithm == ED25519_SHA256 else f", {bits} bits"
    return (f"; DKIM key for {domain}, selector {selector} ({algorithm}{size}); private key: {path}\n"
            f"; publish this TXT record in the {domain} zone:\n"
            f"{selector}._domainkey.{domain}. IN TXT {strings}\n"
            f"\n"
            f"# then add to relaywatch.toml (and run relaywatch reload):\n"
            f"[[dkim]]\n"
            f'domain = "{domain}"\n'
            f'selector = "{selector}"\n'
            f'key_file = "{path}"\n')
