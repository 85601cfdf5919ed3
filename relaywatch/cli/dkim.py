"""relaywatch dkim keygen DOMAIN: a signing key, its DNS record and the config to add."""

from __future__ import annotations

from pathlib import Path

import click

from relaywatch.cli.common import fail


@click.group()
def dkim():
    """DKIM signing keys ([[dkim]] in the config)."""


@dkim.command("keygen")
@click.argument("domain")
@click.option("--selector", help="The DNS selector (default: ALGORITHM-YYYYMM, e.g. rsa-202612).")
@click.option("--algorithm", type=click.Choice(["rsa", "ed25519"]), default="rsa", show_default=True)
@click.option("--bits", type=click.IntRange(1024, 8192), default=2048, show_default=True, help="RSA key size.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Directory for the private key (DOMAIN.SELECTOR.key, mode 0600).")
def dkim_keygen(domain, selector, algorithm, bits, out_dir):
    """Create a signing key; print its DNS TXT record and the config to add."""
    from relaywatch.config import parse_domain, parse_selector
    from relaywatch.config.dkim_key import ALGORITHMS, KeyProblem
    from relaywatch.receive.dkim import default_selector, keygen
    algorithm = next(a for a in ALGORITHMS if a.startswith(algorithm))
    try:
        domain = parse_domain(domain)
        selector = parse_selector(selector or default_selector(algorithm))
        click.echo(keygen(domain, selector, algorithm, bits, Path(out_dir)), nl=False)
    except (KeyProblem, ValueError) as exc:
        fail(str(exc))
