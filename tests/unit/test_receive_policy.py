"""ReceivePolicy.is_trusted: its answers are kept per client address, for the config they came from."""

from __future__ import annotations

from relaywatch.config import parse_config
from relaywatch.receive.policy import ReceivePolicy

CONNECTORS = [{"name": "a", "type": "partner", "domains": ["a.test"]}]


def config(trusted: list[str]):
    return parse_config({"server": {"trusted_networks": trusted}, "connectors": CONNECTORS})


def test_is_trusted_follows_a_config_change_of_trusted_networks():
    current = [config(["10.0.0.0/8"])]
    policy = ReceivePolicy(lambda: current[0], store=None)
    assert policy.is_trusted("10.1.2.3") and policy.is_trusted("10.1.2.3")   # the second answer is the kept one
    assert not policy.is_trusted("192.0.2.1")
    assert policy.is_trusted("192.0.2.1", user="alice")
    assert not policy.is_trusted("not an address")
    current[0] = config(["192.0.2.0/24"])          # a reload: the kept answers are the old config's
    assert not policy.is_trusted("10.1.2.3")
    assert policy.is_trusted("192.0.2.1")


def test_is_trusted_keeps_a_bounded_number_of_answers():
    policy = ReceivePolicy(lambda: cfg, store=None)
    cfg = config(["10.0.0.0/8"])
    for n in range(5000):
        assert policy.is_trusted(f"10.0.{n // 256}.{n % 256}")
    assert len(policy._trusted) <= 4096
    assert not policy.is_trusted("192.0.2.1") and policy.is_trusted("10.0.0.1")
