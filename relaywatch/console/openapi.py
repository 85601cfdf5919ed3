"""The OpenAPI 3.1 document of the console, built from the route table (console/api_routes.py ROUTES).

The shapes are those docs/json.md documents.  Every field the API returns is
declared here, nested ones too (a test compares real responses with these
schemas key by key, tests/acceptance/test_openapi_schemas.py); the meaning of
each field stays in docs/json.md, which the descriptions point at.  Objects
whose keys are data (``checks``, ``overrides``, a filter) or remote evidence
(``dns``, ``tls``, a certificate) are typed ``object`` without properties.
"""

from __future__ import annotations

from relaywatch import __version__

_DOC = "see docs/json.md"


def _obj(description: str, **props) -> dict:
    return {"type": "object", "description": description, "properties": props}


_STR, _INT, _BOOL, _NUM, _OBJ = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "number"}, \
    {"type": "object"}
_TIME = {"type": "string", "format": "date-time"}


def _null(schema: dict) -> dict:
    """schema or null (a field docs/json.md says may be null)."""
    return {"oneOf": [schema, {"type": "null"}]}


def _list(items: dict) -> dict:
    return {"type": "array", "items": items}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


_DESTINATION = _obj("Which smart host / MX (1-based) of how many", host=_STR, ip=_null(_STR),
                    port=_null(_INT), index=_null(_INT), count=_null(_INT))
_STS = _obj("The MTA-STS policy broken (4.7.320 tls.sts_policy)", policy_domain=_STR, policy_type=_STR,
            policy_id=_STR, mode=_STR, mx=_list(_STR), max_age=_INT, mx_host=_STR, result_type=_STR)
_DANE = _obj("The TLSA records not met (4.7.320 tls.dane)", policy_domain=_STR, policy_type=_STR, mx_host=_STR,
             tlsa_name=_STR, tlsa=_list(_STR), usable=_list(_STR), result_type=_STR, reason=_STR, subtype=_STR,
             presented=_obj("The leaf's digests and the chain's subjects", cert_sha256=_STR, spki_sha256=_STR,
                            chain=_list(_STR)))
# A classified failure: MESSAGE's last_error, an attempt's error, an incident's latest_error.
_FAILURE = _obj(f"A classified failure (last_error, {_DOC})", code=_STR, smtp_code=_INT, title=_STR,
                subtype=_null(_STR), detail=_STR, phase=_STR, permanent=_BOOL, at={"type": ["string", "number"]},
                kind=_STR, destination=_null(_DESTINATION), reply=_null(_STR), errno=_null(_STR),
                dns=_null(_OBJ), tls=_null(_OBJ), sts=_STS, dane=_DANE,
                v={"type": "integer", "description": "The stored format version; only in an incident's "
                                                    "latest_error, which is shown as stored (at: Unix time)"})
_RECIPIENT = _obj("A recipient of a queue entry", address=_STR,
                  status={"type": "string", "enum": ["pending", "deferred", "delivered", "failed", "expired"]},
                  last_error=_null(_ref("Failure")), notify=_null(_STR), orcpt=_null(_STR))
_MESSAGE_FIELDS = dict(
    id=_STR, sender=_STR, message_id=_STR, received_at=_TIME, expires_at=_TIME,
    status={"type": "string", "enum": ["queued", "deferred", "held", "active"]}, attempts=_INT,
    next_attempt_at=_null(_TIME), connector=_STR, route={"type": "string", "enum": ["connector", "local", "internet"]},
    domain=_null(_STR), size=_INT, ret=_null({"type": "string", "enum": ["FULL", "HDRS"]}), envid=_null(_STR),
    is_dsn=_BOOL, is_tls_report=_BOOL, utf8_headers=_BOOL, smtputf8=_BOOL, recipients=_list(_RECIPIENT),
    notice_pending=_null(_obj("An NDR that could not be built yet", recipients=_list(_STR), error=_null(_STR),
                              since=_null(_TIME), tries=_null(_INT), retry_at=_null(_TIME))))
_ATTEMPT = _obj(f"One delivery attempt (attempt_history, {_DOC})", at=_TIME, duration=_NUM,
                destination=_null(_DESTINATION),
                recipients=_list(_obj("This attempt's outcome for one recipient", address=_STR, status=_STR,
                                      error=_null(_ref("Failure")), reply=_null(_STR))),
                hosts_tried=_list(_ref("Failure")), notices=_list(_STR))
_PROBE = _obj(f"connector test --json ({_DOC})", connector=_STR, type=_STR, test_address=_STR,
              at={"type": ["string", "number"]}, ok=_BOOL,
              steps=_list(_obj("One step of the walk", step=_STR, ok=_BOOL, ms=_NUM, detail=_STR)),
              error=_null(_ref("Failure")), greeting=_null(_STR), certificate=_null(_OBJ))
_INCIDENT = {**_obj(
    f"INCIDENT ({_DOC}); an incident a newer version stored may carry more fields, shown as stored",
    id=_INT, state={"type": "string", "enum": ["open", "resolved"]},
    severity={"type": "string", "enum": ["warning", "critical"]}, connector=_STR, connector_type=_STR, code=_STR,
    title=_STR, kind=_null(_STR), subtype=_null(_STR), opened_at=_TIME, updated_at=_TIME, resolved_at=_null(_TIME),
    first_seen=_TIME, last_seen=_TIME, messages=_INT, recipients=_INT, peak_messages=_INT,
    oldest_received_at=_null(_TIME), first_expires_at=_null(_TIME), destinations=_list(_STR),
    latest_error=_null(_ref("Failure")),
    diagnosis=_null(_obj("The likely cause picked from the evidence", cause=_STR, text=_STR, facts=_OBJ)),
    causes=_list(_STR), fixes=_list(_STR), actions=_list(_STR), escalations=_list(_STR), delivered_late=_INT,
    expired=_INT, probe=_null(_PROBE),
    probe_history=_list(_obj("A probe in short", at={"type": ["string", "number"]}, ok=_BOOL, code=_null(_STR),
                             step=_null(_STR))),
    detail=_null(_STR),
    # the facts of the watch's own warnings (incident_facts.py), each only on its kind
    certificate=_OBJ, level=_INT, count=_INT, quota=_INT, top=_list(_OBJ), reply=_STR, refused=_INT,
    problems=_list(_OBJ), seen=_list(_OBJ), node=_STR, node_address=_STR, last_heartbeat_at={"type": ["string", "number"]},
    notifications=_list(_obj("A notification of a transition", transition=_STR, channel=_STR, state=_STR,
                             attempts=_INT, last_error=_null(_STR), sent_at=_null({"type": ["string", "number"]}))),
    audit=_list(_ref("AuditRecord"))), "additionalProperties": True}

SCHEMAS = {
    "Error": _obj("An error; field names the input at fault", error={"type": "string"}, field={"type": "string"}),
    "Health": _obj("Readiness", status={"type": "string"}, checks={"type": "object"},
                   reasons={"type": "array", "items": {"type": "string"}}),
    "Failure": _FAILURE,
    "Message": {**_obj(f"MESSAGE ({_DOC})", **_MESSAGE_FIELDS), "required": ["id", "status", "recipients"]},
    "MessageList": _obj("A page of the queue; next_after is the id to pass as after for the next page (null: "
                        "last page)", messages={"type": "array", "items": {"$ref": "#/components/schemas/Message"}},
                        next_after={"type": ["string", "null"]}),
    "MessageDetail": {"allOf": [{"$ref": "#/components/schemas/Message"},
                                _obj(f"attempt_history ({_DOC})", attempt_history=_list(_ATTEMPT))]},
    "ActionResult": _obj("What an action did", id={"type": "string"}, action={"type": "string"},
                         done={"type": "boolean"}, result={"type": "string"}, who={"type": "string"},
                         message={"oneOf": [{"$ref": "#/components/schemas/Message"}, {"type": "null"}]}),
    "Incident": _INCIDENT,
    "FixResult": _obj("A Fix now action: its plan (steps) and, unless dry_run, what was done",
                      incident_id={"type": "integer"}, action={"type": "string"}, dry_run={"type": "boolean"},
                      steps={"type": "array", "items": {"type": "string"}}, undo={"type": "boolean"},
                      undo_note={"type": ["string", "null"]}, done={"type": "array", "items": {"type": "string"}},
                      who={"type": "string"}),
    "IncidentList": _obj("Incidents", incidents={"type": "array", "items": {"$ref": "#/components/schemas/Incident"}}),
    "ConnectorList": _obj("Connectors", connectors={"type": "array", "items": _obj(
        "A connector", name={"type": "string"}, type={"type": "string"}, domains={"type": "array"},
        state={"type": "string", "enum": ["healthy", "incident open", "certificate expiring", "paused", "disabled"]},
        enabled={"type": "boolean"}, paused={"type": "boolean"}, open_incidents={"type": "array"},
        last_good_delivery={"type": ["string", "null"]})}),
    "ConnectorTest": _PROBE,
    "Job": _obj("A bulk action by filter", id={"type": "integer"}, action={"type": "string"}, filter={"type": "object"},
                who={"type": "string"}, reason={"type": "string"}, matched={"type": "integer"},
                state={"type": "string", "enum": ["running", "done", "failed"]}, done={"type": "integer"},
                skipped={"type": "integer"}, failed={"type": "integer"}, errors={"type": "array"},
                started_at={"type": "string"}, finished_at={"type": ["string", "null"]}),
    "JobList": _obj("Bulk actions, newest first", jobs={"type": "array", "items": {"$ref": "#/components/schemas/Job"}}),
    "BulkResult": _obj("What a filter matched; the job doing it (null for a dry run)", action={"type": "string"},
                       filter={"type": "object"}, dry_run={"type": "boolean"}, matched={"type": "integer"},
                       sample={"type": "array", "items": {"type": "string"}},
                       job={"oneOf": [{"$ref": "#/components/schemas/Job"}, {"type": "null"}]}),
    "Config": _obj(f"config show --json ({_DOC})", source=_STR, overrides=_OBJ,
                   domains=_list(_obj("A domain of ours", name=_STR, type=_STR, mailboxes=_list(_STR))),
                   connectors=_list(_obj("A connector as running (overrides applied)", name=_STR, type=_STR,
                                         domains=_list(_STR), enabled=_BOOL, paused=_BOOL,
                                         smart_hosts=_list(_STR), tls=_STR, tls_verify=_BOOL))),
    "Trace": _obj(f"TRACE: every event of one message, oldest first ({_DOC})", id={"type": "string"},
                  message_id={"type": "string"}, sender={"type": "string"}, connector={"type": "string"},
                  route={"type": "string"}, status={"type": "string"}, in_queue={"type": "boolean"},
                  domain=_null(_STR), size=_INT, is_dsn=_BOOL,
                  attempts={"type": "integer"}, recipients=_list(_obj("A recipient", address=_STR, status=_STR)),
                  events={"type": "array", "items": _obj(
                      "received | attempt | action | ndr_sent | delay_notice_sent | delivered | bounced | "
                      "expired | deleted | moved; each event has the fields docs/json.md lists for it",
                      at={"type": "string"}, event={"type": "string"},
                      # received (recipients: the addresses), attempt (recipients: the outcomes)
                      client=_null(_STR), helo=_null(_STR), auth_user=_null(_STR), sender=_STR,
                      recipients=_list({"oneOf": [_STR, _obj(
                          "An attempt's outcome for one recipient", address=_STR, status=_STR, code=_null(_STR),
                          smtp_code=_null(_INT), reply=_null(_STR))]}), size=_INT,
                      # attempt
                      n=_INT, connector=_STR, host=_null(_STR), ip=_null(_STR), port=_null(_INT), duration=_NUM,
                      hosts_tried=_list(_obj("Another host of the attempt", host=_null(_STR), ip=_null(_STR),
                                             code=_null(_STR), reply=_null(_STR))),
                      # action, ndr_sent / delay_notice_sent, moved
                      action=_STR, who=_STR, reason=_null(_STR), incident_id=_null(_INT), job=_null(_INT), ids=_list(_STR),
                      moved_to=_STR)}),
    "TraceList": _obj("The traces of a Message-ID's queue entries", message_id={"type": "string"},
                      traces={"type": "array", "items": {"$ref": "#/components/schemas/Trace"}}),
    "NodeList": _obj(f"relaywatch nodes --json ({_DOC})", nodes={"type": "array", "items": _obj(
        "A node", name={"type": "string"}, address={"type": "string"}, role={"type": "string"},
        version={"type": "string"}, state={"type": "string", "enum": ["alive", "draining", "dead", "stopped"]},
        leader={"type": "boolean"}, started_at={"type": "number"}, heartbeat_at={"type": "number"},
        instance=_STR, heartbeat_age=_NUM, leases={"type": "integer"}, received=_INT, delivered=_INT)}, leader_term={"type": "integer"}, lapse={"type": "number"}),
    "AuditRecord": _obj("One action", id={"type": "integer"}, at={"type": "string"}, who={"type": "string"},
                        action={"type": "string"}, incident_id={"type": ["integer", "null"]}, detail=_OBJ,
                        undone_at={"type": ["string", "null"]}),
    "AuditLog": _obj("Audit records, newest first", audit=_list(_ref("AuditRecord"))),
    "TlsReport": _obj(f"tls-report show --json ({_DOC})", day={"type": "string"}, domains={
        "type": "array", "items": _obj("One policy domain", policy_domain={"type": "string"},
        policies={"type": "array", "description": "As the domain's RFC 8460 report has them", "items": _obj(
            "One policy of the report (RFC 8460 4.4)",
            policy=_obj("The policy", **{"policy-type": _STR, "policy-string": _list(_STR), "policy-domain": _STR,
                                         "mx-host": _list(_STR)}),
            summary=_obj("Sessions", **{"total-successful-session-count": _INT,
                                        "total-failure-session-count": _INT}),
            **{"failure-details": _list(_obj("Failed sessions of one kind", **{
                "result-type": _STR, "sending-mta-ip": _STR, "receiving-mx-hostname": _STR, "receiving-ip": _STR,
                "failed-session-count": _INT, "failure-reason-code": _STR}))})},
        report=_null(_obj("What became of the day's report", report_id=_STR, sent_at=_null(_TIME), outcome={
            "type": "object", "additionalProperties": _STR,
            "description": "By rua URI, what became of it; {\"rua\": \"none published\"} without one"})))}),
}

_STATUS_TEXT = {202: "Accepted: running in the background", 400: "Bad input (the field is named)", 401: "A token is required, or the token is wrong",
                404: "Unknown id", 409: "The action does not apply now", 413: "The body is too large",
                415: "The body is not JSON", 503: "Not ready"}


def document(routes) -> dict:
    paths: dict[str, dict] = {}
    for r in routes:
        op: dict = {"summary": r.summary, "operationId": f"{r.method.lower()}_{r.path.strip('/').replace('/', '_')}"
                    .replace("{", "").replace("}", "")}
        if r.params:
            op["parameters"] = [{"name": p.name, "in": p.where, "required": p.where == "path" or p.required,
                                 "description": p.description, "schema": p.schema} for p in r.params]
        if r.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": r.body}}}
        ok = {"description": "OK"}
        if r.response:
            ok["content"] = {r.content_type: {"schema": {"$ref": f"#/components/schemas/{r.response}"}}}
        elif r.content_type != "application/json":
            ok["content"] = {r.content_type: {"schema": {"type": "string"}}}
        responses = {"200": ok}
        for status in (*r.errors, *(() if r.public else (401,))):
            schema = {"$ref": "#/components/schemas/Health" if status == 503 else "#/components/schemas/Error"}
            responses[str(status)] = {"description": _STATUS_TEXT[status]}
            if status != 401:
                responses[str(status)]["content"] = {"application/json": {"schema": schema}}
        op["responses"] = responses
        op["security"] = [] if r.public else [{"bearer": []}]
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "relaywatch mail flow console", "version": __version__,
                 "description": "The CLI's JSON (docs/json.md) over HTTP. From loopback with no http.tokens "
                                "configured no token is needed; otherwise send Authorization: Bearer <token>."},
        "paths": paths,
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
