"""When a failing connector is probed next (watch/probe_schedule.py), by table: short gaps
while the failure is young, an eighth of its age as it grows, probe_interval at most; a new
failure pattern starts again; after a passing probe only a new failure brings the next one
forward."""

import pytest

from relaywatch.model import Failure
from relaywatch.incident import BacklogSummary
from relaywatch.watch.probe_schedule import (FailurePattern, ProbeTiming, follow, next_probe_at, probe_gap, probed,
                                             spread)

T0 = 1_800_000_000.0
DEFAULT = ProbeTiming.of(2.0, 30.0)


def refused(at):
    return Failure(code="4.4.316", smtp_code=450, title="Connection refused", subtype="refused",
                   detail="h refused the connection.", phase="connect", permanent=False, at=at,
                   kind="connect.refused")


def group(code="4.4.316", first=T0, latest=T0):
    return BacklogSummary(connector="onprem", code=code, messages=3, recipients=3, oldest_received_at=T0 - 100,
                          first_expires_at=T0 + 86_400, first_failure_at=first,
                          latest_error=refused(latest) if latest is not None else None)


GAPS = [
    # failing for   timing                      gap
    (0,             DEFAULT,                    2.0),    # the shortest while young
    (16,            DEFAULT,                    2.0),
    (20,            DEFAULT,                    2.5),    # then an eighth of the age
    (120,           DEFAULT,                    15.0),
    (240,           DEFAULT,                    30.0),   # probe_interval at most
    (86_400,        DEFAULT,                    30.0),
    (0,             ProbeTiming.of(2.0, 0.5),   0.5),    # probe_interval shorter than the shortest: it wins
    (200,           ProbeTiming.of(5.0, 300.0), 25.0),
]


@pytest.mark.parametrize("failing_for, timing, gap", GAPS)
def test_the_gap_after_a_failed_probe_grows_with_the_failures_age(failing_for, timing, gap):
    assert probe_gap(failing_for, timing) == gap


def test_a_dead_host_is_probed_every_2_s_at_first_then_less_and_less_often():
    pattern, at, probes = FailurePattern(frozenset({"4.4.316"}), T0), None, []
    while (at := next_probe_at(pattern, DEFAULT)) < T0 + 400:
        probes.append(round(at - T0, 1))
        pattern = probed(pattern, False, at)
    assert probes[:10] == [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0, 20.2]
    assert len([p for p in probes if p < 240]) == 30        # in the first four minutes; then every 30 s
    assert [round(b - a, 1) for a, b in zip(probes, probes[1:])][-6:] == [26.7, 30.0, 30.0, 30.0, 30.0, 30.0]


NEXT = [
    # name                                  pattern                                                        due
    ("first probe: shortest after the start", FailurePattern(frozenset({"c"}), T0),                        T0 + 2),
    ("seen late: due at once",              FailurePattern(frozenset({"c"}), T0 - 3600),                   T0 - 3598),
    ("after a failed probe",                FailurePattern(frozenset({"c"}), T0, probed_at=T0 + 80),       T0 + 90),
    ("a probe of an earlier pattern",       FailurePattern(frozenset({"c"}), T0, probed_at=T0 - 100),      T0 + 2),
    ("after a passing probe: the longest",  FailurePattern(frozenset({"c"}), T0, T0 + 5, passed_at=T0 + 5), T0 + 35),
]


@pytest.mark.parametrize("name, pattern, due", NEXT, ids=[n[0] for n in NEXT])
def test_next_probe(name, pattern, due):
    assert next_probe_at(pattern, DEFAULT) == due


def test_connectors_are_spread_by_up_to_a_tenth_of_each_gap():
    shares = {name: spread(name) for name in ("onprem", "partner", "sink", "contoso")}
    assert all(0 <= s < 1 for s in shares.values()) and len(set(shares.values())) == 4
    assert spread("onprem") == shares["onprem"]   # the same on every node and every start
    pattern = FailurePattern(frozenset({"c"}), T0, probed_at=T0 + 120)
    assert T0 + 135 < next_probe_at(pattern, DEFAULT, 0.99) <= T0 + 120 + 15 * 1.1


FOLLOW = [
    # name                           previous                                                   groups                                   expected
    ("nothing deferred: forgotten",  FailurePattern(frozenset({"4.4.316"}), T0),                [],                                      None),
    ("first seen: its first failure", None,                                                     [group(first=T0 - 50)],                  FailurePattern(frozenset({"4.4.316"}), T0 - 50)),
    ("first seen: the newest group's start", None,                                              [group(first=T0 - 50), group("4.4.317", first=T0 - 9)],
     FailurePattern(frozenset({"4.4.316", "4.4.317"}), T0 - 9)),
    ("first seen, no failure time",  None,                                                      [group(first=None)],                     FailurePattern(frozenset({"4.4.316"}), T0)),
    ("same codes: unchanged",        FailurePattern(frozenset({"4.4.316"}), T0 - 50, T0 - 10),  [group(first=T0 - 50)],                  FailurePattern(frozenset({"4.4.316"}), T0 - 50, T0 - 10)),
    ("a code gone: unchanged",       FailurePattern(frozenset({"4.4.316", "4.4.317"}), T0 - 50), [group(first=T0 - 50)],                 FailurePattern(frozenset({"4.4.316", "4.4.317"}), T0 - 50)),
    ("a new code: starts again",     FailurePattern(frozenset({"4.4.316"}), T0 - 50, T0 - 10),  [group(), group("4.4.317")],             FailurePattern(frozenset({"4.4.316", "4.4.317"}), T0, T0 - 10)),
    ("passed, then released mail still deferred: unchanged",
     FailurePattern(frozenset({"4.4.316"}), T0 - 50, T0 - 5, T0 - 5),                            [group(first=T0 - 50, latest=T0 - 20)],  FailurePattern(frozenset({"4.4.316"}), T0 - 50, T0 - 5, T0 - 5)),
    ("passed, then a failure: starts again at it",
     FailurePattern(frozenset({"4.4.316"}), T0 - 50, T0 - 5, T0 - 5),                            [group(first=T0 - 50, latest=T0 - 1)],   FailurePattern(frozenset({"4.4.316"}), T0 - 1, T0 - 5)),
]


@pytest.mark.parametrize("name, previous, groups, expected", FOLLOW, ids=[f[0] for f in FOLLOW])
def test_follow(name, previous, groups, expected):
    assert follow(previous, groups, T0) == expected


def test_a_failure_after_a_pass_brings_the_next_probe_forward():
    passed = probed(FailurePattern(frozenset({"4.4.316"}), T0 - 50), True, T0 - 5)
    assert next_probe_at(passed, DEFAULT) == T0 + 25
    failed_again = follow(passed, [group(first=T0 - 50, latest=T0 - 1)], T0)
    assert next_probe_at(failed_again, DEFAULT) == T0 + 1
