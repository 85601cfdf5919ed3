"""Every configuration key is in the README, and every key issue 14 added (AUTH and the
submission ports, DSN's return limit, DKIM, MTA-STS, DANE, TLS reporting) is checked:
a bad value is one line naming the key, as ``relaywatch config check`` prints it."""

import dataclasses
import re
from pathlib import Path

import pytest

from relaywatch.config import model, parse_config
from relaywatch.errors import ConfigError

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
SECTIONS = (model.ServerConfig, model.QueueConfig, model.DnsConfig, model.MtaStsConfig, model.TlsReportingConfig,
            model.DeliveryConfig, model.Domain, model.Connector, model.AlertsConfig, model.VerifyConfig,
            model.DkimSigning, model.HttpConfig)
NOT_IN_THE_FILE = {("Connector", "paused"), ("DkimSigning", "key")}     # set by a fix / the loaded key


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: s.__name__)
def test_every_key_is_in_the_readme(section):
    missing = [f.name for f in dataclasses.fields(section) if (section.__name__, f.name) not in NOT_IN_THE_FILE
               and not re.search(r"`[^`\n]*\b" + re.escape(f.name) + r"\b[^`\n]*`", README)]
    assert missing == []


def _connector(**keys):
    return {"connectors": [{"name": "p", "type": "partner", "domains": ["p.test"], **keys}]}


def _dkim(**keys):
    return {"dkim": [{"domain": "contoso.test", "selector": "s1", "key_file": "/nonexistent/k.pem", **keys}]}


@pytest.mark.parametrize("key, raw", [
    ("server.submission_listen", {"server": {"submission_listen": ["nohost:notaport"]}}),
    ("server.submissions_listen", {"server": {"submissions_listen": [5]}}),
    ("server.users_file", {"server": {"users_file": "/nonexistent/users"}}),
    ("server.auth_max_failures", {"server": {"auth_max_failures": 0}}),
    ("server.auth_failure_delay", {"server": {"auth_failure_delay": "soon"}}),
    ("server.auth_block_time", {"server": {"auth_block_time": "-1s"}}),
    ("server.tls_client_ca", {"server": {"tls_client_ca": "/nonexistent/ca.pem"}}),
    ("server.client_certs", {"server": {"client_certs": {"alice": "nothex"}}}),
    ("queue.ndr_return_limit", {"queue": {"ndr_return_limit": "lots"}}),
    ("mta_sts.enabled", {"mta_sts": {"enabled": "yes"}}),
    ("mta_sts.cache", {"mta_sts": {"cache": ""}}),
    ("mta_sts.fetch_timeout", {"mta_sts": {"fetch_timeout": "0s"}}),
    ("mta_sts.ca_file", {"mta_sts": {"ca_file": "/nonexistent/ca.pem"}}),
    ("mta_sts.https_port", {"mta_sts": {"https_port": 0}}),
    ("tls_reporting.enabled", {"tls_reporting": {"enabled": "yes"}}),
    ("tls_reporting.organization_name", {"tls_reporting": {"enabled": True, "organization_name": ""}}),
    ("tls_reporting.contact_info", {"tls_reporting": {"contact_info": 5}}),
    ("tls_reporting.submitter", {"tls_reporting": {"submitter": 5}}),
    ("delivery.dane", {"delivery": {"dane": "required"}}),
    ("connectors[0].mta_sts", _connector(mta_sts=1)),
    ("connectors[0].dane", _connector(dane="maybe")),
    ("dkim[0].domain", _dkim(domain="")),
    ("dkim[0].selector", _dkim(selector="")),
    ("dkim[0].key_file", _dkim()),
    ("dkim[0].algorithm", _dkim(algorithm="md5")),
    ("dkim[0].sub_domains", _dkim(sub_domains="yes")),
    ("dkim[0].headers", _dkim(headers="from")),
    ("dkim[0].oversign_headers", _dkim(oversign_headers=5)),
    ("dkim[0].canonicalization", _dkim(canonicalization="loose")),
])
def test_a_bad_value_of_each_new_key_is_named(key, raw):
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert any(p.startswith(f"{key}: ") for p in info.value.problems), info.value.problems
