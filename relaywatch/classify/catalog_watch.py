"""The catalog's warnings of the watch (codes ``watch:<kind>``): no SMTP reply
says them, so they have no SMTP code."""

from __future__ import annotations

from relaywatch.classify.catalog_entry import CatalogEntry, for_both

WARNINGS: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        id="watch.cert_expiring", code="watch:cert_expiring", smtp_code=None,
        title="Destination certificate expires soon",
        explanation=(
            "A probe of the connector found that the destination's TLS certificate expires within "
            "alerts.cert_warning_days. Mail still flows; once the certificate has expired, delivery "
            "through the connector stops with 4.7.320 until a new one is installed. The incident says "
            "which host, the certificate's subject, issuer and expiry date. It resolves when a probe "
            "sees a certificate that is valid for longer."),
        causes={
            "on_premises": ("The server's certificate was not renewed, or was renewed and not installed on the server.",),
            "partner": ("The partner has not renewed their server's certificate yet.",),
        },
        fixes={
            "on_premises": ("Renew the server's certificate and install it before the date in the incident.",),
            "partner": ("Tell the partner the date their certificate expires (in the incident) and ask them to renew it.",),
        }),
    CatalogEntry(
        id="watch.invalid_recipients", code="watch:invalid_recipients", smtp_code=None,
        title="Invalid recipients near the quota",
        explanation=(
            "In the last 24 hours relaywatch saw at least 80% of alerts.invalid_recipient_quota "
            "recipients that do not exist: destinations answered 5.1.x, or mail to them expired. "
            "Services that count invalid recipients against a sender may throttle or block it past "
            "the quota. The incident lists the domains and connectors most of them came from; it "
            "escalates at 100% and resolves when the day's count falls below 80%."),
        causes={
            "on_premises": (
                "An on-premises server was retired while mail for its users still goes to it.",
                "Lists or applications send to mistyped or abandoned addresses.",
            ),
            "partner": (
                "An on-premises server was retired while mail for its users still goes to it.",
                "Lists or applications send to mistyped or abandoned addresses at the domains listed.",
            ),
        },
        # The warning is about the whole relay (connector "*"), so it reads the
        # "partner" texts: they keep the decommission hint too.
        fixes=for_both(
            "If an on-premises server was retired, use the decommission action on its 4.4.316 incident so unknown recipients are rejected at once.",
            "Check the domains listed for mistyped or abandoned addresses.",
        )),
    CatalogEntry(
        id="watch.notice_failed", code="watch:notice_failed", smtp_code=None,
        title="Non-delivery reports cannot be built",
        explanation=(
            "relaywatch owes a sender a non-delivery report but could not build it, for example because "
            "the message's body could not be read. The recipients are recorded as they ended (delivered, "
            "failed or expired) and no message is delivered again; each held-back report is retried on "
            "the queue's retry intervals. The senders are not told until it succeeds. The incident "
            "resolves when no report is held back."),
        causes=for_both("A defect in relaywatch, or a spool file that was removed or cannot be read."),
        fixes=for_both(
            "Look for 'could not be built' in relaywatch's log and report it as a relaywatch bug.",
            "relaywatch queue list shows the messages whose NDR is held back.",
        )),
    CatalogEntry(
        id="watch.node_down", code="watch:node_down", smtp_code=None,
        title="A relaywatch node is down",
        explanation=(
            "A node of the cluster (several relaywatch nodes sharing one PostgreSQL queue) has not "
            "written its heartbeat for longer than server.node_lapse and did not stop cleanly. What "
            "it had leased went back to the queue at once and is delivered by the other nodes; if it "
            "led the cluster, another node took over the watch. Mail sent to its address is not "
            "accepted until it is back. The incident resolves when the node beats again."),
        causes=for_both(
            "The node's process was killed or crashed, its machine is down, or it cannot reach the database.",
        ),
        fixes=for_both(
            "relaywatch nodes shows when it last beat; look at its log (systemctl status relaywatch).",
            "Start it again; a node taken out for good is stopped cleanly (SIGTERM, systemctl stop): it is then shown stopped, not down.",
        )),
)
