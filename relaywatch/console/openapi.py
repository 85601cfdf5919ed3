"""The OpenAPI 3.1 document of the console, built from the route table (console/api_routes.py ROUTES).

The shapes are those docs/json.md documents; the schemas here name their
top-level fields and point at docs/json.md for the rest, rather than
restating every nested field (and drifting from it).
"""

from __future__ import annotations

from relaywatch import __version__

_DOC = "see docs/json.md"


def _obj(description: str, **props) -> dict:
    return {"type": "object", "description": description, "properties": props}


SCHEMAS = {
    "Error": _obj("An error; field names the input at fault", error={"type": "string"}, field={"type": "string"}),
    "Health": _obj("Readiness", status={"type": "string"}, checks={"type": "object"},
                   reasons={"type": "array", "items": {"type": "string"}}),
    "Message": {"type": "object", "description": f"MESSAGE ({_DOC})", "required": ["id", "status", "recipients"],
                "properties": {k: {} for k in ("id", "sender", "message_id", "received_at", "expires_at", "status",
                                               "attempts", "next_attempt_at", "connector", "route", "domain",
                                               "size", "recipients")}},
    "MessageList": _obj("A page of the queue; next_after is the id to pass as after for the next page (null: "
                        "last page)", messages={"type": "array", "items": {"$ref": "#/components/schemas/Message"}},
                        next_after={"type": ["string", "null"]}),
    "MessageDetail": {"allOf": [{"$ref": "#/components/schemas/Message"},
                                _obj(f"attempt_history ({_DOC})", attempt_history={"type": "array"})]},
    "ActionResult": _obj("What an action did", id={"type": "string"}, action={"type": "string"},
                         done={"type": "boolean"}, result={"type": "string"}, who={"type": "string"},
                         message={"oneOf": [{"$ref": "#/components/schemas/Message"}, {"type": "null"}]}),
    "Incident": {"type": "object", "description": f"INCIDENT ({_DOC})"},
    "FixResult": _obj("A Fix now action: its plan (steps) and, unless dry_run, what was done",
                      incident_id={"type": "integer"}, action={"type": "string"}, dry_run={"type": "boolean"},
                      steps={"type": "array", "items": {"type": "string"}}, undo={"type": "boolean"},
                      undo_note={"type": ["string", "null"]}, done={"type": "array", "items": {"type": "string"}},
                      who={"type": "string"}),
    "IncidentList": _obj("Incidents", incidents={"type": "array", "items": {"$ref": "#/components/schemas/Incident"}}),
    "ConnectorList": _obj("Connectors", connectors={"type": "array", "items": _obj(
        "A connector", name={"type": "string"}, type={"type": "string"}, domains={"type": "array"},
        state={"type": "string", "enum": ["healthy", "incident open", "paused", "disabled"]},
        enabled={"type": "boolean"}, paused={"type": "boolean"}, open_incidents={"type": "array"},
        last_good_delivery={"type": ["string", "null"]})}),
    "ConnectorTest": _obj(f"connector test --json ({_DOC})", connector={"type": "string"}, ok={"type": "boolean"},
                          steps={"type": "array"}, error={}, greeting={}, certificate={}),
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
    "Config": _obj(f"config show --json ({_DOC})", source={"type": "string"}, overrides={"type": "object"},
                   domains={"type": "array"}, connectors={"type": "array"}),
    "Trace": _obj(f"TRACE: every event of one message, oldest first ({_DOC})", id={"type": "string"},
                  message_id={"type": "string"}, sender={"type": "string"}, connector={"type": "string"},
                  route={"type": "string"}, status={"type": "string"}, in_queue={"type": "boolean"},
                  attempts={"type": "integer"}, recipients={"type": "array"},
                  events={"type": "array", "items": _obj(
                      "received | attempt | action | ndr_sent | delay_notice_sent | delivered | bounced | "
                      "expired | deleted | moved", at={"type": "string"}, event={"type": "string"})}),
    "TraceList": _obj("The traces of a Message-ID's queue entries", message_id={"type": "string"},
                      traces={"type": "array", "items": {"$ref": "#/components/schemas/Trace"}}),
    "NodeList": _obj(f"relaywatch nodes --json ({_DOC})", nodes={"type": "array", "items": _obj(
        "A node", name={"type": "string"}, address={"type": "string"}, role={"type": "string"},
        version={"type": "string"}, state={"type": "string", "enum": ["alive", "draining", "dead", "stopped"]},
        leader={"type": "boolean"}, started_at={"type": "number"}, heartbeat_at={"type": "number"},
        leases={"type": "integer"})}, leader_term={"type": "integer"}, lapse={"type": "number"}),
    "AuditLog": _obj("Audit records, newest first", audit={"type": "array", "items": _obj(
        "One action", id={"type": "integer"}, at={"type": "string"}, who={"type": "string"},
        action={"type": "string"}, incident_id={"type": ["integer", "null"]}, detail={"type": "object"},
        undone_at={"type": ["string", "null"]})}),
    "TlsReport": _obj(f"tls-report show --json ({_DOC})", day={"type": "string"}, domains={
        "type": "array", "items": _obj("One policy domain", policy_domain={"type": "string"},
        policies={"type": "array", "description": "As the domain's RFC 8460 report has them"},
        report={"type": ["object", "null"]})}),
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
