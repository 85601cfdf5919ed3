"""DKIM private keys: loading a ``[[dkim]]`` key_file (PEM) and making new ones.

Below both config and receive/: ``config check`` loads every key so an
unusable file is an error naming ``dkim[i].key_file``, the loaded
``SigningKey`` is what receive/dkim_sign.py signs with, and receive/dkim.py's
keygen makes new ones with ``generate_key``.  ``cryptography`` is
imported only when a key is loaded, so a relay that signs nothing never
imports it.
"""

from __future__ import annotations

import base64
import stat
from dataclasses import dataclass
from pathlib import Path

RSA_SHA256 = "rsa-sha256"
ED25519_SHA256 = "ed25519-sha256"
ALGORITHMS = (RSA_SHA256, ED25519_SHA256)
MIN_RSA_BITS = 1024          # RFC 8301 §3.2: verifiers must not accept less
GOOD_RSA_BITS = 2048         # ...and signers should use at least this


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
