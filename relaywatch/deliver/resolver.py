"""DNS for delivery: MX of a recipient domain (RFC 5321 5.1), host addresses,
the TXT records MTA-STS looks for (RFC 8461 3.1) and the TLSA records of DANE
(RFC 7672).

An MX host that is an alias (CNAME) keeps its final name (``AddressAnswer.canonical``):
DANE looks for TLSA records there first (RFC 7672 2.2.3, deliver/dane.py ``tlsa_hosts``).

Every query asks for DNSSEC (the DO bit, and AD, RFC 6840 5.7), so a
validating resolver says with the AD bit which answers it validated: DANE
trusts only those (``MxAnswer.secure``, ``AddressAnswer.secure``,
``TlsaAnswer.secure``).  relaywatch does not validate signatures itself.  A
resolver's Extended DNS Error (RFC 8914), "DNSSEC Bogus" say, is kept in the
DNS facts of a failure (``ede``).

dnspython with our own nameservers (``[dns] nameservers``, host:port) and our
own deadline: dnspython's ``lifetime`` overshoots, so every lookup also runs
under ``asyncio.timeout``.  Failures are returned as Observations, so DNS time
is never mistaken for connect time.

TLSA answers are asked once per MX connection, so they are kept for their
TTL (at most ``TLSA_CACHE_SECONDS``): a DANE host that takes a connection a
second costs one TLSA query per TTL, not one per connection.  Failures are
never kept (a bogus answer is asked again on the next connection).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.edns
import dns.exception
import dns.flags
import dns.nameserver
import dns.rcode
import dns.resolver

from relaywatch.classify.observation import Observation, Outcome, Phase
from relaywatch.config import DnsConfig
from relaywatch.deliver.dane import TlsaAnswer, TlsaRecord

TLSA_CACHE_SECONDS = 3600.0     # the most a TLSA answer is kept, whatever its TTL
TLSA_CACHE_SIZE = 10_000        # names kept; the oldest goes first


class DnsFailure(Exception):
    def __init__(self, observation: Observation):
        super().__init__(observation.outcome.value)
        self.observation = observation


@dataclass(frozen=True)
class MxHost:
    preference: int
    host: str


@dataclass(frozen=True)
class MxAnswer:
    hosts: list[MxHost]
    secure: bool               # DNSSEC-validated (AD)


@dataclass(frozen=True)
class AddressAnswer:
    addresses: list[str]
    secure: bool               # DNSSEC-validated (AD); an IP literal has no name to validate
    canonical: str = ""        # the name the addresses belong to, after any CNAMEs ("": the host itself)


def _secure(answer) -> bool:
    return answer is not None and bool(answer.response.flags & dns.flags.AD)


class Resolver:
    def __init__(self, config: DnsConfig):
        self.timeout = config.timeout
        if config.nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in config.nameservers]
            self.nameserver_label = ", ".join(f"{h}:{p}" for h, p in config.nameservers)
        else:
            self._resolver = dns.asyncresolver.Resolver()
            self.nameserver_label = ", ".join(str(n) for n in self._resolver.nameservers)
        self._resolver.lifetime = config.timeout
        self._resolver.use_edns(0, dns.flags.DO, 1232)
        self._resolver.flags = dns.flags.RD | dns.flags.AD
        self._resolver.timeout = min(config.timeout, 2.0)
        # The last answer per host name, with its TTL: evidence for "the address
        # changed" diagnoses (a connection failure names the answer it used).
        self.answers: dict[str, dict] = {}
        self._tlsa: dict[str, tuple[float, TlsaAnswer]] = {}     # name -> (kept until, answer)
        self.clock = time.time

    def _facts(self, name: str, qtype: str, rcode: str | None = None, ede: dict | None = None) -> dict:
        facts = {"name": name, "type": qtype, "rcode": rcode, "nameserver": self.nameserver_label}
        if ede is not None:
            facts["ede"] = ede
        return facts

    async def _query(self, name: str, qtype: str, domain_level: bool):
        """Returns an answer or None (NODATA); raises DnsFailure otherwise."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self._resolver.resolve(name, qtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            outcome = Outcome.DOMAIN_NOT_FOUND if domain_level else Outcome.DNS_NXDOMAIN
            raise DnsFailure(Observation(Phase.DNS, outcome, dns=self._facts(name, qtype, "NXDOMAIN"))) from None
        except dns.resolver.NoNameservers as exc:
            rcode = _rcode_of(exc)
            raise DnsFailure(Observation(Phase.DNS, Outcome.DNS_SERVFAIL,
                                         dns=self._facts(name, qtype, rcode, _ede_of(exc)))) from None
        except (TimeoutError, dns.exception.Timeout):
            raise DnsFailure(Observation(Phase.DNS, Outcome.DNS_TIMEOUT,
                                         dns=self._facts(name, qtype, None))) from None
        except dns.exception.DNSException as exc:
            raise DnsFailure(Observation(Phase.DNS, Outcome.DNS_SERVFAIL, dns=self._facts(name, qtype, None),
                                         note=type(exc).__name__)) from None

    async def mx(self, domain: str) -> list[MxHost]:
        return (await self.mx_answer(domain)).hosts

    async def mx_answer(self, domain: str) -> MxAnswer:
        answer = await self._query(domain, "MX", domain_level=True)
        if answer is None or answer.rrset is None:
            # no MX record: the domain itself (RFC 5321 5.1); NODATA is an answer too, AD or not
            return MxAnswer([MxHost(0, domain)], _secure(answer))
        records = sorted(answer.rrset, key=lambda r: r.preference)
        hosts = [MxHost(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in records]
        if any(h.host in ("", ".") for h in hosts):
            # RFC 7505: a null MX means the domain accepts no mail at all.
            raise DnsFailure(Observation(Phase.DNS, Outcome.NULL_MX, dns=self._facts(domain, "MX", "NOERROR")))
        return MxAnswer(hosts, _secure(answer))

    async def tlsa(self, name: str) -> TlsaAnswer:
        """The TLSA records at ``name`` (``_25._tcp.<host>``); none for NXDOMAIN or
        NODATA; raises DnsFailure when the lookup fails (SERVFAIL: bogus, for DANE).
        An answer is kept for its TTL (module docstring)."""
        now = self.clock()
        kept = self._tlsa.get(name)
        if kept is not None and kept[0] > now:
            return kept[1]
        answer, ttl = await self._tlsa_answer(name)
        self._tlsa.pop(name, None)
        if ttl > 0:
            if len(self._tlsa) >= TLSA_CACHE_SIZE:
                del self._tlsa[next(iter(self._tlsa))]
            self._tlsa[name] = (now + min(ttl, TLSA_CACHE_SECONDS), answer)
        return answer

    async def _tlsa_answer(self, name: str) -> tuple[TlsaAnswer, float]:
        """The TLSA answer and how long it may be kept (0: not at all)."""
        try:
            answer = await self._query(name, "TLSA", domain_level=False)
        except DnsFailure as failure:
            if failure.observation.outcome is Outcome.DNS_NXDOMAIN:
                return TlsaAnswer((), False), 0.0
            raise
        if answer is None or answer.rrset is None:
            return TlsaAnswer((), _secure(answer)), 0.0
        return TlsaAnswer(tuple(TlsaRecord(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in answer.rrset),
                          _secure(answer)), float(answer.rrset.ttl)

    async def alias_secure(self, host: str) -> bool:
        """Is ``host`` an alias whose own CNAME record is DNSSEC-validated?  Asked
        when the address answer through the chain is not: a CNAME query is
        answered by the alias's record alone, not its (maybe unsigned) target's.
        Raises DnsFailure when the lookup fails."""
        answer = await self._query(host, "CNAME", domain_level=False)
        return answer is not None and answer.rrset is not None and _secure(answer)

    async def txt(self, name: str) -> list[str]:
        """The TXT strings of ``name`` (each record's strings joined), [] for none
        (NXDOMAIN or NODATA); raises DnsFailure when the lookup itself fails."""
        try:
            answer = await self._query(name, "TXT", domain_level=False)
        except DnsFailure as failure:
            if failure.observation.outcome is Outcome.DNS_NXDOMAIN:
                return []
            raise
        if answer is None or answer.rrset is None:
            return []
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer.rrset]

    async def addresses(self, host: str) -> list[str]:
        return (await self.address_answer(host)).addresses

    async def address_answer(self, host: str) -> AddressAnswer:
        try:
            return AddressAnswer([str(ipaddress.ip_address(host))], False)
        except ValueError:
            pass
        if host == "localhost":
            return AddressAnswer(["127.0.0.1"], False)
        # AAAA is asked only when there is no A record: one round trip in the
        # common case, and an AAAA problem never hides usable A records.
        for qtype in ("A", "AAAA"):
            answer = await self._query(host, qtype, domain_level=False)
            if answer is not None and answer.rrset is not None:
                found = [r.address for r in answer.rrset]
                self.answers[host] = {"name": host, "type": qtype, "rcode": "NOERROR", "answer": found,
                                      "ttl": answer.rrset.ttl, "nameserver": self.nameserver_label}
                # A validating resolver answers an alias with the whole CNAME chain
                # in one response, and its AD bit covers every step of it.
                return AddressAnswer(found, _secure(answer), answer.canonical_name.to_text(omit_final_dot=True))
        raise DnsFailure(Observation(Phase.DNS, Outcome.DNS_NO_ADDRESS, dns=self._facts(host, "A/AAAA", "NOERROR")))


def _rcode_of(exc: dns.resolver.NoNameservers) -> str:
    """The rcode the nameservers answered with (SERVFAIL, REFUSED, ...).

    dnspython records each failed server as (server, tcp, port, error, response)
    where error is the rcode's text when the server answered with one.
    """
    for error in exc.kwargs.get("errors", []) or []:
        if len(error) > 3 and isinstance(error[3], str) and error[3].isupper():
            return error[3]
    return "SERVFAIL"


def _ede_of(exc: dns.resolver.NoNameservers) -> dict | None:
    """The first Extended DNS Error (RFC 8914) a server attached to its failure, if any:
    a validating resolver says so when the answer is DNSSEC-bogus (code 6)."""
    for error in exc.kwargs.get("errors", []) or []:
        response = error[4] if len(error) > 4 else None
        for option in (response.extended_errors() if response is not None else []):
            return {"code": int(option.code), "text": option.text or _EDE_NAMES.get(int(option.code), "")}
    return None


_EDE_NAMES = {code.value: code.name.replace("_", " ").title().replace("Dnssec", "DNSSEC").replace("Dnskey", "DNSKEY")
              .replace("Rrsigs", "RRSIGs").replace("Nsec", "NSEC") for code in dns.edns.EDECode}
