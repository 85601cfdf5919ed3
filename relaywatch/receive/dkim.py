"""DKIM keys: loading and checking them, ``relaywatch dkim keygen`` and the DNS record to publish.

What ``[[dkim]]`` may say (algorithms, canonicalizations, the header fields
signed by default and those never signed) is here too, for config.py's
checks; the signer applied to a message is receive/dkim_sign.py.  A key
that cannot sign is a ``KeyProblem`` naming the file: RSA under 1024 bits
(RFC 8301), encrypted, not PEM, or of another kind than RSA or Ed25519.
"""

from __future__ import annotations

import base64
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


RSA_SHA256 = "rsa-sha256"
ED25519_SHA256 = "ed25519-sha256"
ALGORITHMS = (RSA_SHA256, ED25519_SHA256)
CANONICALIZATIONS = ("relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple")
MIN_RSA_BITS = 1024          # RFC 8301 §3.2: verifiers must not accept less
GOOD_RSA_BITS = 2048         # ...and signers should use at least this

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


class KeyProblem(ValueError):
    """A key file that cannot sign; the message names the file."""


@dataclass(frozen=True)
class SigningKey:
    algorithm: str           # RSA_SHA256 or ED25519_SHA256
    private: object          # cryptography's RSAPrivateKey or Ed25519PrivateKey
    bits: int
    path: Path

    def sign(self, digest: bytes) -> bytes:
        """The signature over a SHA-256 ``digest`` of the signed header fields."""
        if self.algorithm == ED25519_SHA256:
            return self.private.sign(digest)      # RFC 8463 §3: Ed25519 over the SHA-256 hash
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, utils
        return self.private.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))

    def public_record(self) -> str:
        """The DNS TXT record's value (RFC 6376 §3.6.1; RFC 8463 §4 for Ed25519: the raw key)."""
        from cryptography.hazmat.primitives import serialization
        pub = self.private.public_key()
        if self.algorithm == ED25519_SHA256:
            raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
        der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"

    @property
    def loose_permissions(self) -> bool:
        """Readable or writable by others than its owner and group (OpenDKIM's RequireSafeKeys)."""
        try:
            return bool(self.path.stat().st_mode & (stat.S_IROTH | stat.S_IWOTH))
        except OSError:
            return False


def load_key(path: Path) -> SigningKey:
    """The private key in ``path`` (PEM: PKCS#8 or PKCS#1), or KeyProblem saying what is wrong."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyProblem(f"cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise KeyProblem(f"{path} holds no PEM private key (no -----BEGIN line); "
                         f"create one with: relaywatch dkim keygen DOMAIN")
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except TypeError:            # cryptography: "Password was not given but private key is encrypted"
        raise KeyProblem(f"{path}: the key is encrypted; relaywatch needs it without a passphrase") from None
    except Exception as exc:     # ValueError for bad data, UnsupportedAlgorithm for an odd key
        raise KeyProblem(f"{path} does not parse as a PEM private key: {exc}") from None
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < MIN_RSA_BITS:
            raise KeyProblem(f"{path} is a {private.key_size}-bit RSA key; DKIM needs at least {MIN_RSA_BITS} "
                             f"bits (RFC 8301) and {GOOD_RSA_BITS} are advised")
        return SigningKey(RSA_SHA256, private, private.key_size, path)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return SigningKey(ED25519_SHA256, private, 256, path)
    curve = getattr(private, "curve", None)
    kind = f"an elliptic-curve ({curve.name})" if curve is not None else f"a {type(private).__name__}"
    raise KeyProblem(f"{path} is {kind} key; DKIM signs with RSA (rsa-sha256) or Ed25519 (ed25519-sha256) "
                     f"keys only")


def generate_key(algorithm: str, bits: int = GOOD_RSA_BITS) -> tuple[bytes, SigningKey]:
    """A new private key as PKCS#8 PEM, and the key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    if algorithm == ED25519_SHA256:
        private = ed25519.Ed25519PrivateKey.generate()
        bits = 256
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return pem, SigningKey(algorithm, private, bits, Path())


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
