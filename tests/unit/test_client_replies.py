"""The catalog's replies to clients are complete: every refusal the receive side can send has an
entry (catalog_client.py) with that exact text, and every text there is one it sends.

Like the delivery catalog's completeness test, but the replies are not an enum: they are the
string literals of the modules that build them.  So this reads those modules' source (an AST
scan, as test_layers.py does; nothing is imported) and takes every literal that starts as a
refusal does, "4xx " or "5xx ", with each f-string field as "…".  A new reply without an entry
fails here, and so does an entry left behind when a reply is reworded or removed."""

import ast
import functools
import re
from pathlib import Path

from click.testing import CliRunner

from relaywatch.classify.catalog import CATALOG, CLIENT_CATALOG, lookup_client
from relaywatch.classify.catalog_client import CLIENT_REPLIES
from relaywatch.cli import main

PACKAGE = Path(__file__).resolve().parents[2] / "relaywatch"

# A refusal: the 3-digit code, then an enhanced code or (the verification's 450) a field.
REFUSAL = re.compile(r"[45][0-9][0-9] (?:[245]\.[0-9]{1,3}\.[0-9]{1,3}|…)( |$)")
ONLY_A_CODE = re.compile(r"[45][0-9][0-9] [245]\.[0-9]{1,3}\.[0-9]{1,3} ?")   # a meter's label, "421 4.7.0 "

# Literals that are a code and a field only: the reply is made elsewhere, and its texts are
# gathered from there (admission.py's Refused reasons, which session.py sends after "421 4.7.0 ").
WRAPPERS = {"421 4.7.0 …": "Refused"}


def reply_modules() -> list[Path]:
    """receive/ and the kernel modules it takes replies from (route.py's Refusal,
    dsn_params.py's ParameterError): every module receive/ imports, but the catalog itself."""
    own = sorted((PACKAGE / "receive").glob("*.py"))
    imported = set()
    for path in own:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("relaywatch."):
                imported.add(node.module)
    others = []
    for name in sorted(imported):
        path = PACKAGE.parent.joinpath(*name.split(".")).with_suffix(".py")
        if path.exists() and not name.startswith(("relaywatch.receive.", "relaywatch.classify.catalog")):
            others.append(path)
    return own + others


def _text(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values)
    return None


@functools.cache
def sent_replies() -> dict[str, set[str]]:
    """Every refusal text the receive side can send -> the modules it is in."""
    found: dict[str, set[str]] = {}
    wrapped: dict[str, list[str]] = {call: [] for call in WRAPPERS.values()}
    for path in reply_modules():
        tree = ast.parse(path.read_text())
        parts = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in wrapped
                    and node.args and _text(node.args[0]) is not None):
                wrapped[node.func.id].append(_text(node.args[0]))
            text = _text(node)
            if id(node) in parts or text is None or not REFUSAL.match(text) or ONLY_A_CODE.fullmatch(text):
                continue
            text = text.rstrip("\r\n")
            if text in WRAPPERS:
                continue
            found.setdefault(text, set()).add(path.name)
    for prefix, call in WRAPPERS.items():
        assert wrapped[call], f"no {call}(...) reasons found for {prefix!r}: did the wrapper move?"
        for reason in wrapped[call]:
            found.setdefault(prefix.replace("…", reason), set()).add(call)
    return found


def catalogued() -> dict[str, str]:
    return {text: e.id for e in CLIENT_REPLIES for text in e.replies}


def test_the_scan_finds_the_replies_it_should():
    """The scan itself works: known replies from each kind of source are found."""
    sent = sent_replies()
    for text in ("535 5.7.8 Authentication credentials invalid",                 # sasl.py, a constant
                 "552 5.3.4 Message too big (the limit is … bytes)",              # an f-string
                 "501 5.5.4 RET must be FULL or HDRS",                            # dsn_params.py (kernel)
                 "550 5.1.2 Address literals are not routed by this relay; use a domain name",   # route.py
                 "421 4.7.0 Too many connections, try again later",               # admission.py, wrapped
                 "450 … <…>: Cannot verify the recipient now (…); try again later"):   # verify.py
        assert text in sent, text
    assert len(sent) > 70


def test_every_reply_to_clients_has_a_catalog_entry():
    known = catalogued()
    missing = sorted(f"{text}  ({', '.join(sorted(where))})" for text, where in sent_replies().items()
                     if text not in known)
    assert missing == [], "add these to relaywatch/classify/catalog_client.py"


def test_every_catalogued_reply_is_one_the_server_sends():
    sent = sent_replies()
    stale = sorted(f"{text}  ({entry})" for text, entry in catalogued().items() if text not in sent)
    assert stale == [], "reworded or removed: update relaywatch/classify/catalog_client.py"


def test_client_entries_are_consistent():
    ids = [e.id for e in CLIENT_REPLIES]
    assert len(ids) == len(set(ids)) and not set(ids) & CATALOG.keys()
    texts = [t for e in CLIENT_REPLIES for t in e.replies]
    assert len(texts) == len(set(texts)), "a reply belongs to one entry"
    for e in CLIENT_REPLIES:
        assert e.id.startswith("client.") and e.title and e.when and e.client and e.relay, e.id
        for text in e.replies:     # each text carries its entry's codes (the verification's 450: its own)
            assert text.startswith(f"{e.smtp_code} {e.code} ") or text.startswith(f"{e.smtp_code} … "), text


def test_lookup_client_by_id_code_and_reply_code():
    assert [e.id for e in lookup_client("client.auth_failed")] == ["client.auth_failed"]
    assert {e.id for e in lookup_client("5.7.8")} == {"client.auth_failed", "client.auth_authzid"}
    assert {e.id for e in lookup_client("535")} == {"client.auth_failed", "client.auth_authzid"}
    assert {e.id for e in lookup_client("454 4.7.0")} == {"client.tls_unavailable", "client.auth_unavailable",
                                                         "client.auth_blocked"}
    assert lookup_client("9.9.9") == []


def test_errors_explains_a_reply_to_clients():
    shown = CliRunner().invoke(main, ["errors", "5.7.8"])
    assert shown.exit_code == 0, shown.output
    assert "535 5.7.8 Authentication credentials invalid" in shown.output
    assert "The client's admin:" in shown.output and "relaywatch user add NAME" in shown.output
    assert "Delivery:" not in shown.output      # 5.7.8 is no delivery code: no section to tell apart


def test_errors_labels_a_code_that_is_both_a_delivery_code_and_a_reply():
    shown = CliRunner().invoke(main, ["errors", "5.6.7"]).output
    delivery, _, client = shown.partition("Replies relaywatch's SMTP server sends to clients")
    assert delivery.startswith("Delivery: what a destination answered relaywatch")
    assert "(client." not in delivery and "(client.smtputf8_required)" in client
    assert any(f"({e.id})" in delivery for e in CATALOG.values() if e.code == "5.6.7")


def test_errors_lists_the_replies_to_clients_in_their_own_section():
    everything = CliRunner().invoke(main, ["errors"]).output
    head, _, section = everything.partition("Replies relaywatch's SMTP server sends to clients")
    assert "(connect.refused)" in head and section
    for e in CLIENT_REPLIES:
        assert f"({e.id})" in section and f"({e.id})" not in head


def test_errors_json_has_both_families():
    import json
    data = json.loads(CliRunner().invoke(main, ["errors", "--json"]).output)
    families = {d["id"]: d["family"] for d in data}
    assert families["connect.refused"] == "delivery" and families["client.auth_blocked"] == "client"
    blocked = next(d for d in data if d["id"] == "client.auth_blocked")
    assert blocked["smtp_code"] == 454 and blocked["code"] == "4.7.0" and blocked["permanent"] is False
    assert blocked["replies"] == ["454 4.7.0 Too many failed logins from …; try again in …s"]
    assert blocked["when"] and blocked["client"] and any("auth_blocks_total" in r for r in blocked["relay"])
