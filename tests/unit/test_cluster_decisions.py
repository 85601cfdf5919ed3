"""The cluster's pure decisions (relaywatch/cluster/decisions.py), with a fake clock."""

import pytest

from relaywatch.cluster.decisions import Leadership, Timing, alive, down
from relaywatch.cluster.model import NodeBeat, NodeState

T = Timing(interval=5, lapse=30)


def beat(at, state=NodeState.RUNNING):
    return NodeBeat("n", "n:1:a", "127.0.0.1:25", "all", "1", 0.0, at, state=state)


@pytest.mark.parametrize("beat_at,state,now,is_alive,is_down", [
    (100, NodeState.RUNNING, 100, True, False),
    (100, NodeState.RUNNING, 130, True, False),      # exactly the lapse: still alive
    (100, NodeState.RUNNING, 130.1, False, True),
    (100, NodeState.STOPPED, 101, False, False),     # a clean stop is neither alive nor down
    (100, NodeState.STOPPED, 1000, False, False),
    (100, NodeState.DRAINING, 110, True, False),     # finishing its deliveries
    (100, NodeState.DRAINING, 131, False, True),     # killed while draining
])
def test_alive_and_down_by_the_heartbeats_age(beat_at, state, now, is_alive, is_down):
    assert alive(beat(beat_at, state), T, now) is is_alive
    assert down(beat(beat_at, state), T, now) is is_down


def test_the_lease_is_shorter_than_the_lapse_by_one_interval_so_a_takeover_comes_within_the_lapse():
    assert T.lease_length == 25
    last_renewal, death = 100, 104.9          # died just before its next heartbeat
    lease_ends = last_renewal + T.lease_length
    takeover = lease_ends + T.interval        # the others ask every interval
    assert takeover <= death + T.lapse + 0.1


@pytest.mark.parametrize("answers,now,term", [
    ([(100, 1)], 100, 1),
    ([(100, 1)], 122.4, 1),                   # until the lease's end less half an interval
    ([(100, 1)], 122.5, None),
    ([(100, 1), (105, 1)], 127, 1),           # renewed
    ([(100, 1), (105, None)], 105, None),     # another holds it
    ([(100, None)], 100, None),
    ([(100, None), (130, 2)], 131, 2),
])
def test_leadership_follows_the_leases_answers(answers, now, term):
    lead = Leadership(T)
    for asked_at, answer in answers:
        lead.answered(asked_at, answer)
    assert lead.term(now) == term


def test_leadership_says_what_changed_for_the_log():
    lead = Leadership(T)
    assert lead.answered(100, None) is None
    assert lead.answered(105, 3) == "leading"
    assert lead.answered(110, 3) is None
    assert lead.answered(115, None) == "stopped leading"
    assert lead.answered(120, 4) == "leading"
    lead.resigned()
    assert lead.term(120) is None
