"""The HTTP API's route table: every path, its handler (console/api.py ``Api``),
parameters and bodies.  The router dispatches on it and the OpenAPI document
(console/openapi.py) is built from it.
"""

from __future__ import annotations

from relaywatch.actions import QUEUE_ACTIONS
from relaywatch.watch.fixes import ACTIONS as FIX_ACTIONS

from relaywatch.console.api_input import MAX_LIMIT, MAX_REASON, MAX_TEXT, ROUTE_KINDS, STATUSES
from relaywatch.console.router import Param, Route

_ID = Param("id", "path", {"type": "string", "pattern": "^[0-9A-Fa-f]{16}$"}, "Queue entry id")
_INCIDENT_ID = Param("id", "path", {"type": "integer", "minimum": 1}, "Incident id")
_QUEUE_FILTERS = (
    Param("status", "query", {"type": "string", "enum": list(STATUSES)}, "Only entries in this status"),
    Param("connector", "query", {"type": "string"}, "Only this connector (or local / internet)"),
    Param("sender", "query", {"type": "string"}, "Envelope sender, exact (case-insensitive); empty: <>"),
    Param("recipient", "query", {"type": "string"}, "A recipient address, exact (case-insensitive)"),
    Param("domain", "query", {"type": "string"}, "A recipient's domain"),
    Param("code", "query", {"type": "string", "minLength": 1},
          "Code of the latest deferral: exact (4.4.316); a class, every code it starts (4: transient, "
          "4.4: network/routing, 5.7: security/policy; 4.4.* is 4.4); or a catalog id (connect.refused: "
          "its code). Anything else is a 400 naming code"),
    Param("older_than", "query", {"type": "string"}, "Received longer ago than this duration, e.g. 1h"),
    Param("route", "query", {"type": "string", "enum": list(ROUTE_KINDS)},
          "How it is routed: a local mailbox, a connector or the internet (MX)"),
    Param("text", "query", {"type": "string", "minLength": 1, "maxLength": MAX_TEXT},
          "A substring (any case) of the sender, a recipient or a recipient's last reply; "
          "<id@host> (in angle brackets): the messages with that Message-ID"),
    Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 100},
          "Entries per page"),
    Param("after", "query", {"type": "string"}, "Page after this id (the previous page's next_after)"),
)
FIX_BODY = {"type": "object", "required": ["reason"], "additionalProperties": False,
            "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": MAX_REASON},
                           "dry_run": {"type": "boolean", "default": False,
                                       "description": "Only say what would be done (the plan), change nothing"}}}
REASON_BODY = {"type": "object", "required": ["reason"], "additionalProperties": False,
               "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": MAX_REASON,
                                         "description": "Why (kept in the audit log with the token's name)"}}}

BULK_FILTERS = ("status", "connector", "sender", "recipient", "domain", "code", "older_than", "route", "text")
BULK_BODY = {"type": "object", "required": ["action", "filter", "reason"], "additionalProperties": False,
             "properties": {"action": {"type": "string", "enum": list(QUEUE_ACTIONS)},
                            "filter": {"type": "object", "additionalProperties": False,
                                       "description": "As GET /api/v1/queue's filters; {} matches every message",
                                       "properties": {name: {"type": "string"} for name in BULK_FILTERS}},
                            "reason": {"type": "string", "minLength": 1, "maxLength": MAX_REASON},
                            "dry_run": {"type": "boolean", "default": False}}}

ROUTES = (
    Route("GET", "/healthz", "healthz", "The process is up", public=True, response="Health"),
    Route("GET", "/readyz", "readyz", "Store, SMTP listener and delivery are working", public=True,
          response="Health", errors=(503,)),
    Route("GET", "/metrics", "metrics", "Prometheus metrics", public=True,
          content_type="text/plain; version=0.0.4"),
    Route("GET", "/api/v1/openapi.json", "openapi", "This document", response=None),
    Route("GET", "/api/v1/queue", "queue_list", "Queued messages, in id order (oldest first), filtered and paged",
          params=_QUEUE_FILTERS, response="MessageList", errors=(400,)),
    Route("GET", "/api/v1/queue/{id}", "queue_show", "One message with its attempt history",
          params=(_ID,), response="MessageDetail", errors=(404,)),
    Route("GET", "/api/v1/messages/{id}/trace", "trace_show",
          "Every event of one message, queued or gone (kept for queue.trace_retention): received, each "
          "attempt, actions and by whom, NDRs, how it ended", params=(_ID,), response="Trace", errors=(404,)),
    Route("GET", "/api/v1/trace", "trace_search", "The traces of every queue entry of a Message-ID",
          params=(Param("message_id", "query", {"type": "string", "minLength": 1, "maxLength": 998},
                        "The Message-ID header's value, with or without <>", required=True),),
          response="TraceList", errors=(400,)),
    Route("GET", "/api/v1/nodes", "nodes", "The nodes sharing this queue: alive, dead or stopped, and the leader",
          response="NodeList"),
    Route("POST", "/api/v1/queue/actions", "queue_bulk",
          "An action on every message a filter matches now: dry_run counts them; otherwise a background job "
          "(202, progress at /api/v1/jobs/{id})", body=BULK_BODY, response="BulkResult", errors=(400, 413, 415)),
    *(Route("POST", f"/api/v1/queue/{{id}}/{action}", "queue_action", summary, params=(_ID,), body=REASON_BODY,
            response="ActionResult", errors=(400, 404, 409, 413, 415))
      for action, summary in (("retry", "Try the message now"), ("hold", "Stop delivery attempts until released"),
                              ("release", "Release a held message; it is tried at once"),
                              ("bounce", "Give up now: NDR to the sender, then remove it"),
                              ("delete", "Remove the message without telling the sender"))),
    Route("GET", "/api/v1/incidents", "incidents_list", "Open incidents (all=true: the history too)",
          params=(Param("all", "query", {"type": "boolean", "default": False}, "Include resolved incidents"),),
          response="IncidentList", errors=(400,)),
    Route("GET", "/api/v1/incidents/{id}", "incident_show",
          "One incident: evidence, diagnosis, actions, notifications, audit",
          params=(_INCIDENT_ID,), response="Incident", errors=(400, 404)),
    Route("POST", "/api/v1/incidents/{id}/fix/{action}", "incident_fix",
          "Fix now: act on an incident (the actions offered are in its actions field); dry_run shows the plan",
          params=(_INCIDENT_ID, Param("action", "path", {"type": "string", "enum": list(FIX_ACTIONS)}, "The action")),
          body=FIX_BODY, response="FixResult", errors=(400, 404, 409, 413, 415)),
    Route("POST", "/api/v1/incidents/{id}/undo", "incident_undo", "Undo the last Fix now action of an incident",
          params=(_INCIDENT_ID,), body=REASON_BODY, response="FixResult", errors=(400, 404, 409, 413, 415)),
    Route("GET", "/api/v1/connectors", "connectors", "Connectors with their state and last good delivery",
          response="ConnectorList"),
    Route("POST", "/api/v1/connectors/{name}/test", "connector_test",
          "Walk the path to a connector (DNS, TCP, greeting, EHLO, STARTTLS, certificate, MAIL/RCPT) without "
          "sending mail; changes nothing, so it takes no body", params=(
              Param("name", "path", {"type": "string"}, "Connector name"),), response="ConnectorTest",
          errors=(404, 413)),
    Route("GET", "/api/v1/config", "config", "The running configuration, Fix now overrides marked",
          response="Config"),
    Route("GET", "/api/v1/jobs", "jobs_list", "Bulk actions of this process, newest first", response="JobList"),
    Route("GET", "/api/v1/jobs/{id}", "job_show", "One bulk action and its progress",
          params=(Param("id", "path", {"type": "integer", "minimum": 1}, "Job id"),), response="Job",
          errors=(404,)),
    Route("GET", "/api/v1/tls-reports", "tls_reports",
          "One UTC day's TLS sessions per recipient domain (RFC 8460 counts) and the report sent for it",
          params=(Param("date", "query", {"type": "string", "format": "date"}, "The UTC day; today by default"),),
          response="TlsReport", errors=(400,)),
    Route("GET", "/api/v1/audit", "audit", "The audit log, newest first",
          params=(Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 100},
                        "Records"),), response="AuditLog", errors=(400,)),
)


