"""The slowloris rules of receive/admission.py, as tables: no sockets, no clock."""

from __future__ import annotations

import pytest

from relaywatch.config import ConfigError, ServerConfig, parse_config
from relaywatch.receive.admission import Admitted, Limits, Phase, Refused, SessionTable

# 10 slots, 2 of them for trusted clients only; busy from 8 sessions on.
LIMITS = Limits(max_connections=10, max_per_ip=3, reserved_trusted=2, busy_command_timeout=10.0)
T, U = True, False      # trusted, untrusted


def table_with(*sessions, limits=LIMITS) -> SessionTable:
    """A table holding ``(key, trusted)`` sessions, each from its own address, admitted at t = 0, 1, 2 ..."""
    table = SessionTable(limits)
    for t, (key, trusted) in enumerate(sessions):
        assert table.admit(key, f"ip-{key}", trusted, float(t)) == Admitted()
    return table


def untrusted(n, prefix="u"):
    return [(f"{prefix}{i}", U) for i in range(n)]


def trusted(n, prefix="t"):
    return [(f"{prefix}{i}", T) for i in range(n)]


# (what, sessions already there, keys put in a transaction, keys that then complete a command,
#  newcomer trusted?, expected verdict)
ADMISSIONS = [
    ("room: admitted", untrusted(3), [], [], U, Admitted()),
    ("a trusted client uses a reserved slot the untrusted cannot", untrusted(8), [], [], T, Admitted()),
    ("untrusted share full: the oldest idle pre-MAIL untrusted session makes room",
     untrusted(8), [], [], U, Admitted(evicted="u0")),
    ("oldest means least recently completed a command, not first connected",
     untrusted(8), [], ["u0", "u1"], U, Admitted(evicted="u2")),
    ("a session in a transaction is never evicted, however old",
     untrusted(8), ["u0", "u1"], [], U, Admitted(evicted="u2")),
    ("nothing to evict: refused", untrusted(8), [k for k, _ in untrusted(8)], [], U,
     Refused("Too many connections, try again later")),
    ("all slots taken: a trusted newcomer evicts an untrusted session first",
     trusted(2) + untrusted(8), [], [], T, Admitted(evicted="u0")),
    ("an untrusted newcomer never displaces a trusted session",
     trusted(10), [], [], U, Refused("Too many connections, try again later")),
    ("a trusted newcomer displaces the oldest trusted one when no untrusted one can go",
     trusted(2) + untrusted(8), [k for k, _ in untrusted(8)], [], T, Admitted(evicted="t0")),
    ("trusted slots all taken, untrusted share not: untrusted still admitted",
     trusted(2) + untrusted(7), [], [], U, Admitted()),
    ("trusted clients filled everything: an untrusted newcomer evicts only untrusted sessions",
     trusted(9) + untrusted(1), [], [], U, Admitted(evicted="u0")),
]


@pytest.mark.parametrize("what, sessions, in_transaction, active, newcomer, expected", ADMISSIONS,
                         ids=[a[0] for a in ADMISSIONS])
def test_admission(what, sessions, in_transaction, active, newcomer, expected):
    table = table_with(*sessions)
    now = float(len(sessions))
    for key in in_transaction:
        table.set_phase(key, Phase.TRANSACTION, now)
    for key in active:
        table.command_completed(key, now)
    assert table.admit("new", "ip-new", newcomer, now + 1) == expected
    if isinstance(expected, Admitted):
        assert "new" in table
        if expected.evicted is not None:
            assert expected.evicted not in table      # its slot is free at once, before it has closed
        assert table.total <= LIMITS.max_connections
        assert table.untrusted <= LIMITS.untrusted_share
    else:
        assert "new" not in table and table.total == len(sessions)


def test_a_session_that_authenticated_counts_as_trusted():
    table = table_with(*untrusted(8))         # the untrusted share is full
    assert table.admit("new", "ip-new", U, 9.0) == Admitted(evicted="u0")
    table.mark_trusted("u1")                  # u1 logged in: its slot is a trusted one now
    assert table.untrusted == 7
    # An untrusted newcomer finds room without evicting, and never displaces the authenticated session.
    assert table.admit("n2", "ip-n2", U, 10.0) == Admitted()
    table.set_phase("n2", Phase.TRANSACTION, 10.0)
    for key in ("u2", "u3", "u4", "u5", "u6", "u7", "new"):
        table.set_phase(key, Phase.TRANSACTION, 10.0)
    assert table.admit("n3", "ip-n3", U, 11.0) == Refused("Too many connections, try again later")
    table.mark_trusted("u1")                  # twice: no change
    assert table.untrusted == 8
    table.release("u1")
    assert table.untrusted == 8 and table.total == 8


def test_the_per_ip_limit_refuses_and_never_evicts():
    table = SessionTable(LIMITS)
    for i in range(3):
        assert table.admit(i, "192.0.2.1", U, float(i)) == Admitted()
    assert table.admit(3, "192.0.2.1", U, 3.0) == Refused("Too many connections from 192.0.2.1, try again later")
    assert table.total == 3 and table.per_ip["192.0.2.1"] == 3


def test_release_frees_the_slot_and_is_a_no_op_for_a_session_already_evicted():
    table = table_with(*untrusted(8))
    assert table.admit("new", "ip-new", U, 9.0) == Admitted(evicted="u0")
    table.release("u0")           # its connection_lost comes later: nothing happens twice
    assert table.total == 8 and table.untrusted == 8 and "ip-u0" not in table.per_ip
    table.release("u1")
    assert table.total == 7 and table.untrusted == 7
    table.command_completed("u1", 10.0)       # a late report about a forgotten session is ignored
    table.set_phase("u1", Phase.TRANSACTION, 10.0)
    assert table.total == 7


def test_a_session_back_from_a_transaction_is_the_most_recently_active():
    table = table_with(*untrusted(8))
    table.set_phase("u0", Phase.TRANSACTION, 8.0)
    table.set_phase("u0", Phase.PRE_MAIL, 9.0)     # the 250 after the final dot
    assert table.admit("new", "ip-new", U, 10.0) == Admitted(evicted="u1")


# -- the busy timeout -------------------------------------------------------------------

# (what, number of untrusted sessions (admitted at t = 0, 1, ...), keys in a transaction,
#  keys completing a command at t = 12, now, expected deadline of "u0", expired at `now`)
DEADLINES = [
    ("not busy: no deadline, nothing expires", 7, [], [], 100.0, None, []),
    ("busy: a command must complete 10 s after the previous one", 8, [], [], 5.0, 10.0, []),
    ("busy: sessions past it expire, the others stay", 8, [], [], 12.5, 10.0, ["u0", "u1", "u2"]),
    ("a completed command sets the deadline again", 8, [], ["u0"], 12.5, 22.0, ["u1", "u2"]),
    ("a session in a transaction has no busy deadline", 8, ["u0", "u1"], [], 12.5, None, ["u2"]),
]


@pytest.mark.parametrize("what, count, in_transaction, active, now, deadline, expired", DEADLINES,
                         ids=[d[0] for d in DEADLINES])
def test_busy_deadlines(what, count, in_transaction, active, now, deadline, expired):
    table = table_with(*untrusted(count))
    for key in in_transaction:
        table.set_phase(key, Phase.TRANSACTION, float(count))
    for key in active:
        table.command_completed(key, 12.0)
    assert table.deadline("u0") == deadline
    assert table.expire(now) == expired
    assert all(key not in table for key in expired)
    assert table.total == count - len(expired)


def test_next_deadline_is_the_earliest_of_trusted_and_untrusted_sessions():
    table = table_with(("t0", T), *untrusted(7))
    assert table.busy
    assert table.next_deadline() == 10.0
    table.command_completed("t0", 4.0)
    assert table.next_deadline() == 11.0        # u0 came at t = 1
    table.release("u6")
    assert not table.busy and table.next_deadline() is None


def test_bytes_alone_never_move_a_deadline():
    # The table is never told about partial input: only command_completed moves a deadline.
    # That is the point against a client trickling one byte every few seconds.
    table = table_with(*untrusted(8))
    assert table.deadline("u3") == 13.0
    assert table.expire(13.0) == ["u0", "u1", "u2", "u3"]


# -- limits from the config --------------------------------------------------------------

@pytest.mark.parametrize("max_connections, reserved, expected", [
    (500, None, (50, 450, 400)),     # the defaults: a tenth reserved, busy from 80 %
    (100, 30, (30, 70, 80)),
    (1, None, (0, 1, 1)),
    (3, 2, (2, 1, 2)),
])
def test_limits_from_the_server_config(max_connections, reserved, expected):
    limits = Limits.from_server_config(ServerConfig(max_connections=max_connections,
                                                    reserved_trusted_connections=reserved))
    assert (limits.reserved_trusted, limits.untrusted_share, limits.high_water) == expected
    assert limits.busy_command_timeout == 10.0


@pytest.mark.parametrize("server, expected", [
    ({"max_connections": 100, "reserved_trusted_connections": 100},
     "server.reserved_trusted_connections: must be less than server.max_connections (100)"),
    ({"reserved_trusted_connections": -1}, "server.reserved_trusted_connections: must be a whole number, 0 or more"),
    ({"reserved_trusted_connections": "10%"}, "server.reserved_trusted_connections: must be a whole number"),
    ({"busy_command_timeout": "0s"}, "server.busy_command_timeout: must be longer than zero"),
    ({"busy_command_timeout": "soon"}, "server.busy_command_timeout: 'soon' is not a duration"),
])
def test_config_check_names_the_slowloris_keys(server, expected):
    with pytest.raises(ConfigError) as err:
        parse_config({"server": server})
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems


def test_the_slowloris_keys_are_read():
    server = parse_config({"server": {"reserved_trusted_connections": 0, "busy_command_timeout": "3s"}}).server
    assert (server.reserved_trusted_connections, server.busy_command_timeout) == (0, 3.0)
    assert parse_config({}).server.reserved_trusted_connections is None     # a tenth of max_connections
