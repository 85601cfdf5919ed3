"""Checks of the PEM files the config names: CA certificates, CRLs, certificate and key pairs.

Each returns why a file cannot be used (naming the file), or None / [] when it
can, so ``config check`` fails on a file the TLS code would refuse later.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def _no_passphrase(*_args):
    raise ValueError("the key is encrypted; relaywatch needs it without a passphrase")


def pem_problem(path: Path, kind: str) -> str | None:
    """Why ``path`` is no usable PEM certificate (kind "certificate") or CRL (kind "CRL"), or None."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    marker = b"-----BEGIN X509 CRL-----" if kind == "CRL" else b"-----BEGIN CERTIFICATE-----"
    if marker not in data:
        return f"{path} holds no PEM {kind} (no {marker.decode()} line)"
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        return f"{path} does not parse as a PEM {kind}: {exc.reason or exc}"
    return None


def key_pair_problems(cert: Path, key: Path, section: str = "server") -> list[str]:
    problem = pem_problem(cert, "certificate")
    if problem:
        return [f"{section}.tls_cert: {problem}"]
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key), password=_no_passphrase)
    except ValueError as exc:
        return [f"{section}.tls_key: {key}: {exc}"]
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return [f"{section}.tls_key: {key} is not the key of the certificate in {section}.tls_cert ({cert})"]
        return [f"{section}.tls_key: {key} is not a usable PEM private key: {exc.reason or exc}"]
    except OSError as exc:
        return [f"{section}.tls_key: cannot read {key}: {exc.strerror}"]
    return []
