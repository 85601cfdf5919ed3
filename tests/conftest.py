import asyncio
import os
import uuid
from pathlib import Path

import pytest
import uvloop

from helpers import STORE_BACKENDS, Relay, Sink, WebhookReceiver, base_config, make_store


@pytest.fixture
async def sink():
    s = await Sink().start()
    yield s
    await s.stop()


@pytest.fixture
async def watchers():
    """Where alerts go: (an SMTP sink for alert email, a webhook receiver)."""
    alert_sink = await Sink().start()
    webhook = await WebhookReceiver().start()
    yield alert_sink, webhook
    await alert_sink.stop()
    await webhook.stop()


@pytest.fixture
async def relay_factory(request, tmp_path):
    """relay_factory(**config sections) -> a started Relay; stopped after the test.
    ``clock=FakeClock()`` runs it on the test's clock instead of the real one.

    On the ``uvloop-postgresql`` variant of a ``both_stores`` test (see below) the
    relay's ``server.store`` is a fresh PostgreSQL schema instead of SQLite."""
    started = []
    store = request.getfixturevalue("pg_dsn") if runs_on_postgresql(request.node) else None

    async def make(clock=None, **sections):
        config = base_config(tmp_path, **sections)
        if store is not None:
            config["server"].setdefault("store", store)
        relay = await Relay(tmp_path, config, clock).start()
        started.append(relay)
        return relay
    yield make
    for relay in started:
        await relay.stop()


PG_DSN = os.environ.get("RELAYWATCH_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_dsn():
    """A DSN whose search_path is a fresh schema (dropped afterwards) on a real PostgreSQL."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            raise    # CI has PostgreSQL: its absence is a failure, not a skip
        pytest.skip(f"no PostgreSQL at {PG_DSN}: {exc}")
    schema = f"rw_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_DSN else "?"
    yield f"{PG_DSN}{sep}options=-csearch_path%3D{schema}"
    admin.execute(f"DROP SCHEMA {schema} CASCADE")
    admin.close()


# -- event loops -------------------------------------------------------------------------
# Production runs ``serve`` on uvloop, whose transports raise differently from
# asyncio's (a write on a transport the peer reset is a RuntimeError there).
# Modules marked ``both_loops`` (delivery and classification end to end) run
# every async test once per loop; the rest run on asyncio's default loop, to keep
# the suite's time down.  RELAYWATCH_TEST_LOOPS=both runs every async test on
# both.  tests/acceptance/test_acceptance.py runs ``serve`` itself, so uvloop, already.

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def pytest_configure(config):
    config.addinivalue_line("markers", "both_loops: run each async test on asyncio and on uvloop")
    config.addinivalue_line("markers", "both_stores: also run each relay_factory test on PostgreSQL (on uvloop)")
    for kind, what in KINDS.items():
        config.addinivalue_line("markers", f"{kind}: {what} (every test in tests/{kind}/)")


# -- kinds -------------------------------------------------------------------------------
# A test's directory is its kind, and the kind is also a marker (`pytest -m unit`), so
# the fast ones run alone without a list of files to keep up to date.  A test file
# directly in tests/ has no kind: collection stops and names it, so it gets placed.

KINDS = {
    "unit": "pure code by table: no sockets, no processes, no store",
    "contract": "the store contract and queries over memory, SQLite and PostgreSQL",
    "integration": "real loopback sockets and relays in the test's process",
    "acceptance": "real `relaywatch serve` processes, a browser, a built wheel",
}
TESTS = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    unplaced = set()
    for item in items:
        kind = item.path.relative_to(TESTS).parts[0] if item.path.is_relative_to(TESTS) else None
        if kind in KINDS:
            item.add_marker(kind)
        elif kind is not None:
            unplaced.add(str(item.path.relative_to(TESTS.parent)))
    if unplaced:
        raise pytest.UsageError(f"{', '.join(sorted(unplaced))}: a test belongs in one of tests/{{{','.join(KINDS)}}}/"
                                " (README, Tests: which kind is which)")


def pytest_asyncio_loop_factories(config, item):
    if item.get_closest_marker("both_loops") is not None or os.environ.get("RELAYWATCH_TEST_LOOPS") == "both":
        loops = dict(LOOPS)
    else:
        loops = {"asyncio": LOOPS["asyncio"]}
    both_stores = item.get_closest_marker("both_stores") is not None or os.environ.get("RELAYWATCH_TEST_STORES") == "both"
    if both_stores and "relay_factory" in item.fixturenames:
        loops["uvloop-postgresql"] = uvloop_on_postgresql
    return loops


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # Fixtures can see how the test went (tests/acceptance/test_dashboard.py screenshots a failure).
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


# -- stores ------------------------------------------------------------------------------
# Modules marked ``both_stores`` (the relay, classification, incident and CLI tests
# end to end) run each test that starts a relay once more with ``server.store`` on
# PostgreSQL.  That variant rides on the loop parametrization above, as a third loop
# factory, so it runs on uvloop only (what production runs): PostgreSQL on both
# loops would double it again for little (the store is the same on both).
# RELAYWATCH_TEST_STORES=both adds the variant to every test that starts a relay.

def uvloop_on_postgresql():
    return uvloop.new_event_loop()


def runs_on_postgresql(item) -> bool:
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("_asyncio_loop_factory") is uvloop_on_postgresql


@pytest.fixture(params=STORE_BACKENDS)
async def store(request, tmp_path):
    """An opened queue store of each kind (memory, SQLite, PostgreSQL), closed afterwards.
    Modules that need a variant (a wake-up counter, say) define their own ``store``."""
    s = make_store(request.param, tmp_path, request)
    await s.open()
    yield s
    await s.close()
