"""Every key the console's API returns is declared in its OpenAPI schema, nested keys too.

A relay over real loopback HTTP is driven into the states whose JSON has the most
fields (a deferred message with DSN parameters and a UTF-8 recipient, an incident, an
audit record, a bulk job, a day of TLS counts with its report sent), and each response
is walked against the schema /api/v1/openapi.json names for its route: a field added
to views.py or model.py without the schema fails here.
"""

import asyncio
import smtplib
import time

import pytest

from helpers import LOOPBACK, eventually, free_port, message
from relaywatch.console.api_routes import ROUTES
from relaywatch.deliver.tls_report import utc_day
from relaywatch.tls_results import TlsCount

from tests.acceptance.test_console import client, incident_opened, partner

pytestmark = pytest.mark.both_loops


def undeclared(value, schema: dict, schemas: dict, where: str = "$") -> list[str]:
    """The paths of the keys in value that schema does not declare.

    An object schema with properties must list every key; one typed ``object``
    without properties is free-form on purpose (data as keys, remote evidence);
    an empty schema ``{}`` for an object or a list says nothing of its shape and
    counts as undeclared."""
    while "$ref" in schema:
        schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
    if "allOf" in schema:
        props: dict = {}
        for part in schema["allOf"]:
            while "$ref" in part:
                part = schemas[part["$ref"].rsplit("/", 1)[1]]
            props.update(part.get("properties", {}))
        return undeclared(value, {"type": "object", "properties": props}, schemas, where)
    if "oneOf" in schema:
        if value is None:
            return []
        choices = [s for s in schema["oneOf"] if s.get("type") != "null"]
        return min((undeclared(value, s, schemas, where) for s in choices), key=len)
    if isinstance(value, dict):
        if "properties" in schema:
            out = []
            for key, item in value.items():
                if key not in schema["properties"]:
                    out.append(f"{where}.{key}")
                else:
                    out += undeclared(item, schema["properties"][key], schemas, f"{where}.{key}")
            return out
        if isinstance(schema.get("additionalProperties"), dict):
            return [p for k, v in value.items()
                    for p in undeclared(v, schema["additionalProperties"], schemas, f"{where}.{k}")]
        return [] if "object" in _types(schema) else [f"{where} (an object without a declared shape)"]
    if isinstance(value, list):
        if "items" in schema:
            return [p for i, v in enumerate(value) for p in undeclared(v, schema["items"], schemas, f"{where}[{i}]")]
        return [] if "array" in _types(schema) and not any(isinstance(v, (dict, list)) for v in value) else \
            [f"{where} (a list without a declared shape)"] if value else []
    return []


def _types(schema: dict) -> set[str]:
    t = schema.get("type")
    return set(t) if isinstance(t, list) else {t} if t else set()


def test_the_checker_finds_an_undeclared_key_at_any_depth():
    schemas = {"M": {"type": "object", "properties": {"a": {"type": "array", "items": {
        "type": "object", "properties": {"b": {"type": "integer"}}}}, "c": {}, "d": {"type": "object"}}}}
    ref = {"$ref": "#/components/schemas/M"}
    assert undeclared({"a": [{"b": 1}], "d": {"any": 1}}, ref, schemas) == []
    assert undeclared({"a": [{"b": 1, "x": 2}], "y": 3}, ref, schemas) == ["$.a[0].x", "$.y"]
    assert undeclared({"c": {"z": 1}}, ref, schemas) == ["$.c (an object without a declared shape)"]


async def test_every_key_the_api_returns_is_declared_in_the_openapi_schema(relay_factory):
    relay = await relay_factory(connectors=partner(free_port()), queue={"retry_intervals": ["1h"]},
                                alerts={"open_after": "0s", "evaluate_interval": "0.2s", "probe_interval": "1h"})
    await relay.send("alice@contoso.test", ["δοκιμή@partner.test"], message("Γειά"), mail_options=["SMTPUTF8"])

    def with_dsn():
        with smtplib.SMTP(LOOPBACK, relay.port, timeout=30) as smtp:
            smtp.sendmail("alice@contoso.test", ["plain@partner.test"], message("plain"),
                          mail_options=["RET=HDRS", "ENVID=env+2B1"],
                          rcpt_options=["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;plain@partner.test"])
    await asyncio.to_thread(with_dsn)

    async def both_deferred():
        q = await relay.queue()
        return q if len(q) == 2 and all(m["recipients"][0]["last_error"] for m in q) else None
    listed = await eventually(both_deferred, what="both messages deferred with an error")
    [inc] = (await incident_opened(relay))["incidents"]
    day = utc_day(time.time())
    await relay.store.add_tls_counts([
        TlsCount(day, "partner.test", "sts", ("version: STSv1", "mode: enforce", "mx: mx.partner.test"), count=3),
        TlsCount(day, "partner.test", "sts", ("version: STSv1", "mode: enforce", "mx: mx.partner.test"),
                 "certificate-host-mismatch", "mx.partner.test", "192.0.2.1", LOOPBACK, count=1,
                 detail="certificate for other.test")])
    await relay.store.claim_tls_report(day, "partner.test", "r1", time.time())
    await relay.store.finish_tls_report(day, "partner.test", {"mailto:tls@partner.test": "queued 1"})

    routes = {(r.method, r.path): r for r in ROUTES}
    held = listed[0]["id"]
    async with client(relay) as http:
        doc = (await http.get("/api/v1/openapi.json")).json()
        schemas = doc["components"]["schemas"]
        calls = [("GET", "/healthz", "/healthz", None), ("GET", "/readyz", "/readyz", None),
                 ("GET", "/api/v1/queue", "/api/v1/queue", None),
                 ("POST", "/api/v1/queue/{id}/hold", f"/api/v1/queue/{held}/hold", {"reason": "look at it"}),
                 *(("GET", "/api/v1/queue/{id}", f"/api/v1/queue/{m['id']}", None) for m in listed),
                 *(("GET", "/api/v1/messages/{id}/trace", f"/api/v1/messages/{m['id']}/trace", None) for m in listed),
                 ("GET", "/api/v1/trace", f"/api/v1/trace?message_id={listed[0]['message_id']}", None),
                 ("GET", "/api/v1/incidents", "/api/v1/incidents", None),
                 ("GET", "/api/v1/incidents/{id}", f"/api/v1/incidents/{inc['id']}", None),
                 ("POST", "/api/v1/incidents/{id}/fix/{action}", f"/api/v1/incidents/{inc['id']}/fix/pause",
                  {"reason": "plan only", "dry_run": True}),
                 ("POST", "/api/v1/queue/actions", "/api/v1/queue/actions",
                  {"action": "retry", "filter": {"connector": "p"}, "reason": "try again"}),
                 ("GET", "/api/v1/jobs", "/api/v1/jobs", None),
                 ("GET", "/api/v1/connectors", "/api/v1/connectors", None),
                 ("POST", "/api/v1/connectors/{name}/test", "/api/v1/connectors/p/test", None),
                 ("GET", "/api/v1/config", "/api/v1/config", None),
                 ("GET", "/api/v1/nodes", "/api/v1/nodes", None),
                 ("GET", "/api/v1/tls-reports", f"/api/v1/tls-reports?date={day}", None),
                 ("GET", "/api/v1/audit", "/api/v1/audit", None)]
        seen = {}
        for method, route, url, body in calls:
            r = await http.request(method, url, json=body)
            assert r.status_code in (200, 202), (url, r.status_code, r.text)
            schema = doc["paths"][route][method.lower()]["responses"]["200"]["content"]["application/json"]["schema"]
            seen[url] = undeclared(r.json(), schema, schemas)
            assert routes[(method, route)].response in schema["$ref"]
        jobs = (await http.get("/api/v1/jobs")).json()["jobs"]
        job = await eventually(lambda: _finished(http, jobs[0]["id"]), what="the bulk job to finish")
        seen["job"] = undeclared(job, {"$ref": "#/components/schemas/Job"}, schemas)
    assert {url: keys for url, keys in seen.items() if keys} == {}
    # What the walk covered: the fields issue 14 added are among the declared ones.
    message_fields = schemas["Message"]["properties"]
    assert {"ret", "envid", "is_dsn", "is_tls_report", "utf8_headers", "smtputf8", "notice_pending"} <= set(message_fields)
    assert {"notify", "orcpt", "last_error"} <= set(message_fields["recipients"]["items"]["properties"])


async def _finished(http, job_id: int):
    job = (await http.get(f"/api/v1/jobs/{job_id}")).json()
    return job if job["state"] != "running" else None
