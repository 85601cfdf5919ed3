"""The catalog's failures past the connection: what the destination answered,
the recipient domain's DNS, local mailboxes and relaywatch's own faults."""

from __future__ import annotations

from relaywatch.classify.catalog_entry import CatalogEntry, for_both

REPLIES: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        id="relay.internal_error", code="4.3.0", smtp_code=451, title="relaywatch failed during delivery",
        explanation=(
            "relaywatch itself hit an error it did not foresee while the connection to the "
            "destination was still up, and dropped the session. Nothing says the destination is at "
            "fault. The message stays queued and is retried; the traceback is in relaywatch's log."),
        causes=for_both("A defect in relaywatch, triggered by this message or this server's answers."),
        fixes=for_both(
            "Find the \"unforeseen error\" line with its traceback in relaywatch's log and report it with the message id.",
        )),
    CatalogEntry(
        id="dns.domain_not_found", code="5.1.2", smtp_code=550, title="Recipient domain does not exist",
        explanation=(
            "The recipient's domain does not exist in DNS (NXDOMAIN for its MX lookup), so no "
            "server can receive mail for it. This is permanent: the sender gets an NDR at once."),
        causes=for_both(
            "The address is mistyped.",
            "The domain registration expired.",
        ),
        fixes={
            "on_premises": ("Tell the sender to check the address.",),
            "partner": ("Tell the sender to check the address, or ask the recipient organisation whether the domain moved.",),
        }, permanent=True),
    CatalogEntry(
        id="dns.null_mx", code="5.1.10", smtp_code=556, title="Recipient domain does not accept mail",
        explanation=(
            "The recipient's domain publishes a null MX record (RFC 7505): it declares that it "
            "receives no mail. This is permanent: the sender gets an NDR at once."),
        causes=for_both("The address is mistyped, or the domain is used only for sending or for the web."),
        fixes={
            "on_premises": ("Tell the sender to check the address.",),
            "partner": ("Tell the sender to use the recipient's real mail domain.",),
        }, permanent=True),
    CatalogEntry(
        id="local.delivery_failed", code="4.3.0", smtp_code=451, title="Local mailbox could not be written",
        explanation=(
            "relaywatch could not write the message into the recipient's local Maildir under the "
            "data directory. The message stays queued and is retried."),
        causes=for_both(
            "The disk holding data_dir is full or read-only.",
            "File permissions under data_dir/mailboxes were changed.",
        ),
        fixes=for_both(
            "Free disk space or fix permissions under data_dir/mailboxes, then run `relaywatch queue retry --connector local`.",
        )),
    CatalogEntry(
        id="recipient.not_found", code="5.1.10", smtp_code=550, title="Recipient not found",
        explanation=(
            "The recipient's domain is authoritative here and has no such mailbox, for example "
            "after its on-premises server was decommissioned and the domain switched to authoritative. "
            "The sender gets an NDR; new mail to that address is rejected at RCPT."),
        causes={
            "on_premises": ("The mailbox never existed, or was not migrated when the on-premises server was retired.",),
            "partner": ("The mailbox never existed here.",),
        },
        fixes={
            "on_premises": ("If the mailbox should exist, add it to the domain's mailboxes and ask the sender to resend.",),
            "partner": ("Tell the sender to check the address.",),
        }, permanent=True),
    CatalogEntry(
        id="smtp.transient_reply", code="4.0.0", smtp_code=450, title="Destination deferred the message",
        explanation=(
            "The destination server accepted the connection but answered a command with a temporary "
            "(4xx) error. The code shown is the server's own; relaywatch will retry."),
        causes={
            "on_premises": ("The server is busy, greylisting, out of storage, or a mailbox is over quota.",),
            "partner": ("The partner's server is busy, greylisting, or a mailbox is over quota.",),
        },
        fixes={
            "on_premises": ("Read the server's reply in the error and check that server's logs for the same time.",),
            "partner": ("If it persists, send the partner the reply text and time and ask what it means.",),
        }),
    CatalogEntry(
        id="smtp.permanent_reply", code="5.0.0", smtp_code=550, title="Destination rejected the message",
        explanation=(
            "The destination server answered with a permanent (5xx) error, such as an unknown "
            "recipient or a policy rejection. relaywatch does not retry; the sender gets an NDR."),
        causes={
            "on_premises": ("The recipient does not exist on the server, or a server-side rule rejected the message.",),
            "partner": ("The recipient does not exist at the partner, or their policy rejected the message.",),
        },
        fixes={
            "on_premises": ("Check the recipient exists on the server; read the reply for the rule that rejected it.",),
            "partner": ("Tell the sender to check the address; for policy rejections, send the partner the reply text.",),
        }, permanent=True),
    CatalogEntry(
        id="smtputf8.not_offered", code="5.6.7", smtp_code=553,
        title="Non-ASCII addresses not permitted for that recipient",
        explanation=(
            "The message's envelope has an internationalised address (RFC 6531): a sender or "
            "recipient whose part before the @ is written in UTF-8, such as δοκιμή@example.test. "
            "Such an address has no ASCII spelling, so it can only be passed to a server that offers "
            "the SMTPUTF8 extension. The destination did not offer it, so relaywatch sent nothing and "
            "failed the recipients at once: rewriting the address would deliver to someone else, or "
            "nowhere. Domain names alone never cause this: relaywatch sends them as A-labels "
            "(xn--...) to any server. A message sent with SMTPUTF8 whose headers hold UTF-8 (RFC 6532) "
            "needs it too, even with ASCII addresses, since its headers have no ASCII form either; "
            "without SMTPUTF8 such header bytes are plain 8-bit content and go on as they are."),
        causes={
            "on_premises": (
                "The on-premises server does not support SMTPUTF8, or has it switched off "
                "(Postfix: smtputf8_enable = no; older Exchange versions have no support).",
                "A filtering appliance in front of the server hides the SMTPUTF8 keyword from EHLO.",
            ),
            "partner": (
                "The partner's mail server does not support internationalised addresses (SMTPUTF8).",
                "The partner's gateway or filter in front of the server strips SMTPUTF8 from its EHLO reply.",
            ),
        },
        fixes={
            "on_premises": (
                "Turn SMTPUTF8 on in the server (Postfix: smtputf8_enable = yes) or upgrade it; check with "
                "`relaywatch connector test NAME` that its EHLO reply lists SMTPUTF8.",
                "Meanwhile, give the user an ASCII alias address and have senders use it.",
            ),
            "partner": (
                "Tell the sender to use the recipient's ASCII address, if the recipient has one.",
                "Ask the partner to enable SMTPUTF8 on their mail server; send them the error and the "
                "destination host from this report.",
            ),
        }, permanent=True),
)
