"""What DKIM signing adds per received message (README "DKIM signing"): a micro-benchmark.

    .venv/bin/python bench/dkim_cost.py

Times ``sign_spool`` -- the step ``Committer.commit`` runs for a trusted client's
message when ``[[dkim]]`` is configured -- on an in-memory spool of 1 KB and 50 KB, with a
2048-bit RSA key and an Ed25519 key, and for a message From a domain without ``[[dkim]]``;
the baseline (no ``[[dkim]]``: commit skips signing) is the spool write and the loop round trip
that every row includes.  Best of 5 runs; keys are made in a temporary directory.
"""

import asyncio
import tempfile
import timeit
from pathlib import Path

from relaywatch.config import parse_config
from relaywatch.receive import dkim as signing
from relaywatch.receive import dkim_sign
from relaywatch.receive.spool import BodySpool

HEAD = (b"Received: from client.test ([127.0.0.1])\r\n\tby relay.test (relaywatch) with ESMTP; "
        b"Tue, 1 Dec 2026 11:00:00 +0000\r\nFrom: Alice <alice@contoso.test>\r\nTo: bob@fabrikam.test\r\n"
        b"Subject: quarterly report\r\nDate: Tue, 1 Dec 2026 11:00:00 +0000\r\nMessage-ID: <1@client.test>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n")
LINE = b"The quick brown fox jumps over the lazy dog, again and again, 0123456789.\r\n"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        entries = []
        for algorithm, selector in ((signing.RSA_SHA256, "rsa"), (signing.ED25519_SHA256, "ed")):
            pem, _ = signing.generate_key(algorithm)
            signing.write_key_file(Path(tmp) / selector, pem)
            entries.append({"domain": "contoso.test", "selector": selector, "key_file": str(Path(tmp) / selector)})
        dkim = parse_config({"dkim": entries}).dkim
        loop = asyncio.new_event_loop()
        for size in (1024, 50 * 1024):
            message = HEAD + LINE * ((size - len(HEAD)) // len(LINE))
            other = message.replace(b"alice@contoso.test", b"alice@elsewhere.test")
            for label, signers, content in (("no [[dkim]] (baseline)", (), message),
                                            (dkim[0].algorithm, dkim[:1], message),
                                            (dkim[1].algorithm, dkim[1:], message),
                                            ("From another domain", dkim, other)):
                def once():
                    spool = BodySpool(Path(tmp))
                    spool.write(content)
                    if signers:
                        loop.run_until_complete(dkim_sign.sign_spool(signers, spool))
                    else:       # what commit does without [[dkim]]: nothing; the spool and loop cost stay
                        loop.run_until_complete(asyncio.sleep(0))
                n = 300
                best = min(timeit.repeat(once, number=n, repeat=5)) / n
                print(f"{len(content):6d} octets  {label:22s} {best * 1e6:7.0f} µs per message")
        loop.close()


if __name__ == "__main__":
    main()
