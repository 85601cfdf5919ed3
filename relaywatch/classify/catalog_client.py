"""The catalog's replies to clients: what relaywatch's own SMTP server refuses
a client with, and why.

The delivery catalog explains what a destination did to relaywatch; these
entries are the other side, what relaywatch said to an application, a device
or a mail server that sent to it.  Each lists the exact texts (``…`` where a
host, an address or a limit goes in), so tests/unit/test_client_replies.py can
check that every reply the receive side can send is here, and nothing else.
"""

from __future__ import annotations

from relaywatch.classify.catalog_entry import ClientReply

_LOG = "The mail log's `rejected` line (client IP, code, detail) says which client and which address."

CLIENT_REPLIES: tuple[ClientReply, ...] = (
    # -- the connection ------------------------------------------------------------------
    ClientReply(
        id="client.too_many_connections", code="4.7.0", smtp_code=421, title="Too many connections",
        replies=("421 4.7.0 Too many connections from …, try again later",
                 "421 4.7.0 Too many connections, try again later"),
        when=("At connect, when the client's IP already holds server.max_connections_per_ip sessions, or "
              "the server holds server.max_connections and no idle session could be evicted."),
        client=("Reuse one connection for several messages and close it after QUIT; fewer parallel senders.",
                "Retry later: nothing was accepted, nothing is lost."),
        relay=("`/metrics`: relaywatch_smtp_sessions_open{listener} against server.max_connections.",
               "Raise server.max_connections_per_ip for a legitimate busy client, or put it in "
               "server.trusted_networks (reserved_trusted_connections keeps room for those).")),
    ClientReply(
        id="client.evicted", code="4.7.0", smtp_code=421, title="Idle connection closed to make room",
        replies=("421 4.7.0 … Server busy; closing an idle connection to make room",),
        when=("The server was full and a new client came: this session had sent no MAIL and was the "
              "longest idle, so its slot went to the newcomer (never a trusted session for an untrusted one)."),
        client=("Open the connection when there is mail to send, not ahead of time; reconnect and retry.",),
        relay=("Many of these: the server is at server.max_connections; see relaywatch_smtp_sessions_open "
               "and consider raising the limit.",)),
    ClientReply(
        id="client.too_many_errors", code="4.7.0", smtp_code=421, title="Too many errors in one session",
        replies=("421 4.7.0 … Too many errors; closing the connection",),
        when="The session got 20 refusals (4xx/5xx) to its commands; relaywatch hangs up.",
        client=("Look at the replies before this one (the client's SMTP log): they say what it got wrong.",),
        relay=("`relaywatch_smtp_rejection_replies_total{reply,enhanced}` shows which refusals it collected; "
               + _LOG,)),
    ClientReply(
        id="client.timeout", code="4.4.2", smtp_code=421, title="Connection closed for idling",
        replies=("421 4.4.2 … Idle for too long; closing the connection",
                 "421 4.4.2 … No command completed in …s while the server is busy; closing the connection"),
        when=("The client sent nothing for server.idle_timeout; or, with the server at 80 % of "
              "max_connections, completed no command within server.busy_command_timeout before MAIL."),
        client=("Send the next command promptly, or QUIT and reconnect when there is mail.",
                "A client behind a slow link: check its network, its TLS handshake time."),
        relay=("Raise server.idle_timeout or server.busy_command_timeout if legitimate clients are slow; "
               "many busy-timeouts mean the server is near server.max_connections.",)),
    ClientReply(
        id="client.server_error", code="4.3.0", smtp_code=421, title="relaywatch failed during the session",
        replies=("421 4.3.0 Temporary server error; closing the connection, please try again later",),
        when="relaywatch hit an error it did not foresee while serving the session; nothing of the "
             "open transaction was accepted.",
        client=("Retry later; the message is still the client's to send.",),
        relay=("Find the traceback in relaywatch's log at that time and report it.",)),
    # -- the queue -----------------------------------------------------------------------
    ClientReply(
        id="client.store_failed", code="4.3.0", smtp_code=451, title="Message could not be queued",
        replies=("451 4.3.0 Could not queue the message; please try again later",),
        when="After the final dot, the spool or the queue store failed, so the message was not committed "
             "(relaywatch never answers 250 before it is).",
        client=("Retry later (any SMTP client does): the message was not accepted.",),
        relay=("relaywatch's log and its `store` incident (`relaywatch incidents list`) say why: "
               "the database unreachable, the spool not writable.",)),
    ClientReply(
        id="client.store_full", code="4.3.1", smtp_code=452, title="relaywatch's disk or database is full",
        replies=("452 4.3.1 Insufficient system storage; please try again later",),
        when="The spool's disk, the database or its quota is full; relaywatch refuses new mail until there is room.",
        client=("Retry later: nothing was accepted.",),
        relay=("Free space under server.data_dir or in the database; the `store` incident "
               "(`relaywatch incidents list`) opens and resolves with it.",)),
    # -- recipients ----------------------------------------------------------------------
    ClientReply(
        id="client.relay_denied", code="5.7.1", smtp_code=554, title="Relaying denied",
        replies=("554 5.7.1 Relaying denied",),
        when=("An untrusted client (not in server.trusted_networks, not logged in) gave a recipient "
              "in a domain relaywatch does not accept ([[domains]] or a connector's domains)."),
        client=("To send anywhere, log in: use the submission port (587) with STARTTLS and AUTH, with a "
                "user the relay's admin created.",
                "Or ask the relay's admin to add the client's address to trusted_networks."),
        relay=("Add the client's network to server.trusted_networks, or create it a user "
               "(`relaywatch user add NAME`) and have it authenticate.",
               "If the domain should be accepted, add it to [[domains]] or a connector. " + _LOG)),
    ClientReply(
        id="client.source_route_denied", code="5.7.1", smtp_code=554, title="Sender-specified routing refused",
        replies=("554 5.7.1 Relaying denied: sender-specified routing (…) is not accepted from this client",),
        when=("An untrusted client gave a recipient that asks the next server to route further "
              "(a source route, or `@`, `%` or `!` in the local part): a classic way to misuse a relay."),
        client=("Send to the plain address (user@domain).",),
        relay=("Trusted clients (trusted_networks, logged-in users) may use such addresses; others never.",)),
    ClientReply(
        id="client.too_many_recipients", code="4.5.3", smtp_code=452, title="Too many recipients",
        replies=("452 4.5.3 Too many recipients (at most … per message)",),
        when="A message got more than 1000 RCPT commands; the ones accepted so far stay.",
        client=("Nothing to fix: a standard client sends the rest in another message after this one.",),
        relay=("The limit is fixed (1000). A client that fails here does not retry the refused "
               "recipients: fix the client.",)),
    ClientReply(
        id="client.recipient_not_found", code="5.1.10", smtp_code=550, title="No such mailbox (authoritative domain)",
        replies=("550 5.1.10 Recipient not found",),
        when="The recipient's domain is authoritative here ([[domains]] type = \"authoritative\") and "
             "does not list that mailbox.",
        client=("Check the address; the sender's users get the refusal as an NDR from their own server.",),
        relay=("Add the mailbox to the domain's `mailboxes`, or make the domain internal_relay if some "
               "mailboxes live on another server. " + _LOG,)),
    ClientReply(
        id="client.recipient_rejected", code="5.1.1", smtp_code=550, title="No such user (recipient verification)",
        replies=("550 5.1.1 <…>: Recipient address rejected: no such user here",),
        when=("domains.verify_recipients is on for the domain and the connector's server said the "
              "address does not exist."),
        client=("Check the address.",),
        relay=("The mail log's `rejected` line has the on-premises server's own answer; if the mailbox "
               "exists, that server refuses it (its recipient filtering). verify.negative_ttl keeps the "
               "answer that long.",)),
    ClientReply(
        id="client.verify_deferred", code="4.4.0", smtp_code=450, title="Recipient cannot be verified now",
        replies=("450 … <…>: Cannot verify the recipient now (…); try again later",),
        when=("domains.verify_recipients is on and the connector's server could not be asked; the code "
              "is that failure's delivery code (4.4.316: `relaywatch errors 4.4.316`), 4.4.0 if none."),
        client=("Retry later: nothing was queued.",),
        relay=("`relaywatch connector test NAME` shows what fails towards the on-premises server.",)),
    ClientReply(
        id="client.verify_failed", code="4.3.0", smtp_code=451, title="Recipient verification failed in relaywatch",
        replies=("451 4.3.0 <…>: Cannot verify the recipient now; try again later",),
        when="domains.verify_recipients is on and the check itself hit an error in relaywatch.",
        client=("Retry later: nothing was queued.",),
        relay=("relaywatch's log has the traceback (`could not verify <address> for IP`); report it.",)),
    ClientReply(
        id="client.recipient_needs_smtputf8", code="5.6.7", smtp_code=553,
        title="Non-ASCII recipient its server cannot take",
        replies=("553 5.6.7 <…>: Non-ASCII addresses not permitted for that recipient "
                 "(its mail server does not offer SMTPUTF8)",),
        when=("Recipient verification found that the on-premises server for this UTF-8 address does "
              "not offer SMTPUTF8, so the address could never be delivered there."),
        client=("Use the recipient's ASCII address, if it has one.",),
        relay=("Enable SMTPUTF8 on the on-premises server, or give the mailbox an ASCII alias.",)),
    ClientReply(
        id="client.bad_recipient", code="5.1.3", smtp_code=501, title="Recipient address cannot be routed",
        replies=("501 5.1.3 Bad recipient address syntax",
                 "501 5.1.3 Recipient address must include a domain (only <postmaster> may go without)",
                 "501 5.1.3 Bad recipient address syntax (domain name too long or empty)",
                 "501 5.1.3 Bad recipient address syntax (not a domain name; an IP address is not routed)"),
        when="RCPT TO's address is not an RFC 5321 mailbox, or has no usable domain.",
        client=("Fix the address the client sends (often an application's configured recipient).",),
        relay=(_LOG,)),
    ClientReply(
        id="client.bad_idn", code="5.1.3", smtp_code=553, title="Recipient domain is not a valid IDN",
        replies=("553 5.1.3 Bad recipient address syntax (not a valid internationalised domain name: …)",),
        when="The recipient's domain has non-ASCII characters that do not make a valid IDNA 2008 name.",
        client=("Check the domain's spelling; the reply says which rule it breaks.",),
        relay=(_LOG,)),
    ClientReply(
        id="client.address_literal", code="5.1.2", smtp_code=550, title="Address literals are not routed",
        replies=("550 5.1.2 Address literals are not routed by this relay; use a domain name",),
        when="The recipient's domain is an address literal (user@[192.0.2.1]).",
        client=("Send to the recipient's domain name.",),
        relay=("By design: relaywatch routes by domain only.",)),
    ClientReply(
        id="client.no_valid_recipients", code="5.5.1", smtp_code=554, title="DATA with no accepted recipient",
        replies=("554 5.5.1 No valid recipients",),
        when="The client sent DATA although every RCPT was refused.",
        client=("See why each RCPT was refused (the replies before this one).",),
        relay=(_LOG,)),
    # -- logging in ----------------------------------------------------------------------
    ClientReply(
        id="client.auth_required", code="5.7.0", smtp_code=530, title="Authentication required",
        replies=("530 5.7.0 Authentication required",),
        when="On a submission or submissions listener, MAIL came before a successful AUTH.",
        client=("Turn on SMTP authentication in the client with its user name and password.",),
        relay=("Create the user (`relaywatch user add NAME`); a client that cannot log in belongs on "
               "port 25 (server.listen) with its address in server.trusted_networks.",)),
    ClientReply(
        id="client.starttls_required", code="5.7.0", smtp_code=530, title="STARTTLS required first",
        replies=("530 5.7.0 Must issue a STARTTLS command first",),
        when="On a submission listener (587), MAIL came before STARTTLS.",
        client=("Enable STARTTLS in the client (or use port 465 with implicit TLS).",),
        relay=("The submission port always requires TLS (RFC 6409); a device that cannot do TLS "
               "belongs on port 25 in server.trusted_networks.",)),
    ClientReply(
        id="client.auth_encryption_required", code="5.7.11", smtp_code=538,
        title="AUTH refused without encryption",
        replies=("538 5.7.11 Encryption required for requested authentication mechanism (STARTTLS first)",),
        when="The client sent AUTH on an unencrypted connection; passwords are never taken in the clear.",
        client=("Enable STARTTLS (port 587) or implicit TLS (port 465) in the client before it logs in.",),
        relay=("Needs server.tls_cert and server.tls_key so STARTTLS is offered.",)),
    ClientReply(
        id="client.auth_failed", code="5.7.8", smtp_code=535, title="Authentication failed",
        replies=("535 5.7.8 Authentication credentials invalid",),
        when=("The user name or the password is wrong (both get the same answer, after the same delay: "
              "server.auth_failure_delay times that IP's failures so far)."),
        client=("Check the user name and password configured in the client.",),
        relay=("The mail log's `auth_failed` line (client, user); `relaywatch user add NAME` sets a new "
               "password. relaywatch_smtp_auth_failed_total counts them; after server.auth_max_failures "
               "the IP is blocked (client.auth_blocked).",)),
    ClientReply(
        id="client.auth_authzid", code="5.7.8", smtp_code=535, title="Acting for another user refused",
        replies=("535 5.7.8 Acting for another user (authorization identity) is not allowed",),
        when="An AUTH PLAIN response named an authorization identity other than the user logging in.",
        client=("Leave the authorization identity empty (or the same as the user name).",),
        relay=("Not supported: to send as other addresses, list them with `relaywatch user add NAME --senders`.",)),
    ClientReply(
        id="client.auth_blocked", code="4.7.0", smtp_code=454, title="Logins from this IP blocked",
        replies=("454 4.7.0 Too many failed logins from …; try again in …s",),
        when=("server.auth_max_failures wrong passwords came from this IP within server.auth_block_time: "
              "AUTH from it is refused for auth_block_time, even with the right password."),
        client=("Fix the password first (a client retrying with a wrong one keeps itself blocked), then "
                "wait for the time in the reply.",),
        relay=("The mail log's `auth_blocked` / `auth_refused` lines; relaywatch_smtp_auth_blocks_total and "
               "relaywatch_smtp_auth_refused_total. A block ends by itself (or by restarting relaywatch); "
               "unexpected blocks from an unknown IP are password guessing.",)),
    ClientReply(
        id="client.auth_unavailable", code="4.7.0", smtp_code=454, title="Authentication temporarily unavailable",
        replies=("454 4.7.0 Temporary authentication failure; try again later",),
        when="relaywatch could not check the password: server.users_file is unreadable or broken, or was "
             "removed by a reload.",
        client=("Retry later.",),
        relay=("relaywatch's log names the problem (`AUTH unavailable: server.users_file: …`); "
               "`relaywatch config check` names the broken line.",)),
    ClientReply(
        id="client.auth_not_offered", code="5.5.1", smtp_code=503, title="AUTH not offered here",
        replies=("503 5.5.1 AUTH is not offered; relaying is allowed by client address",),
        when="The client sent AUTH but this server has no server.users_file (or no TLS certificate).",
        client=("Turn authentication off in the client: relaying goes by its IP address here.",),
        relay=("To offer AUTH, set server.users_file and server.tls_cert/tls_key.",)),
    ClientReply(
        id="client.auth_mechanism", code="5.5.4", smtp_code=504, title="Unknown authentication mechanism",
        replies=("504 5.5.4 Unrecognized authentication type (offered: …)",),
        when="AUTH named a mechanism other than PLAIN or LOGIN.",
        client=("Choose PLAIN or LOGIN in the client (CRAM-MD5, NTLM, XOAUTH2 are not offered).",),
        relay=("Only PLAIN and LOGIN exist, over TLS.",)),
    ClientReply(
        id="client.auth_malformed", code="5.5.2", smtp_code=501, title="Malformed AUTH response",
        replies=("501 5.5.2 Cannot decode the response (base64 of UTF-8 expected)",
                 "501 5.5.2 Malformed PLAIN response (authzid NUL user NUL password)",
                 "501 5.5.2 Empty user name"),
        when="The client's answer in the AUTH exchange is not what PLAIN or LOGIN says.",
        client=("A client bug or a wrong mechanism setting; check the user name is set.",),
        relay=("Counted as a refusal, not as a failed password.",)),
    ClientReply(
        id="client.auth_cancelled", code="5.0.0", smtp_code=501, title="AUTH cancelled by the client",
        replies=("501 5.0.0 Authentication cancelled",),
        when="The client answered `*` in the AUTH exchange (RFC 4954: it gave up).",
        client=("The client itself stopped; see its log for why.",),
        relay=("Nothing to do.",)),
    ClientReply(
        id="client.auth_line_too_long", code="5.5.6", smtp_code=500, title="AUTH response too long",
        replies=("500 5.5.6 Authentication exchange line is too long",),
        when="A line of the AUTH exchange was longer than a user name and password can be.",
        client=("A client bug, or not an SMTP client.",),
        relay=("Nothing to do.",)),
    # -- TLS -----------------------------------------------------------------------------
    ClientReply(
        id="client.tls_unavailable", code="4.7.0", smtp_code=454, title="STARTTLS not available",
        replies=("454 4.7.0 TLS is not available (no certificate configured)",),
        when="The client sent STARTTLS but relaywatch has no server.tls_cert.",
        client=("Retry later, or, for a client on a trusted network, allow sending without TLS.",),
        relay=("Set server.tls_cert and server.tls_key (`relaywatch config check` verifies they load).",)),
    # -- the sender and the parameters ---------------------------------------------------
    ClientReply(
        id="client.sender_not_owned", code="5.7.1", smtp_code=553, title="Sender not allowed for this user",
        replies=("553 5.7.1 <…>: Sender address rejected: not owned by user …",),
        when="The logged-in user has a --senders list and MAIL FROM is not one of its addresses or @domains.",
        client=("Send from one of the user's own addresses, or log in as the user that owns this one.",),
        relay=("`relaywatch user add NAME --senders addr,@domain` replaces the user's line with a new list "
               "(and asks for the password again).",)),
    ClientReply(
        id="client.bad_sender", code="5.1.7", smtp_code=501, title="Bad sender address",
        replies=("501 5.1.7 Bad sender address syntax",),
        when="MAIL FROM's address is not an RFC 5321 mailbox (or <>).",
        client=("Fix the sender address configured in the client or application.",),
        relay=(_LOG,)),
    ClientReply(
        id="client.smtputf8_required", code="5.6.7", smtp_code=553, title="Non-ASCII address without SMTPUTF8",
        replies=("553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter on MAIL FROM (RFC 6531)",),
        when="A MAIL or RCPT address has non-ASCII characters but the transaction was not opened with "
             "MAIL FROM:<…> SMTPUTF8.",
        client=("Enable SMTPUTF8 in the client (relaywatch offers it), or use ASCII addresses.",),
        relay=("Nothing to set: relaywatch always offers SMTPUTF8.",)),
    ClientReply(
        id="client.unknown_parameter", code="5.5.4", smtp_code=555, title="Unknown MAIL or RCPT parameter",
        replies=("555 5.5.4 Unsupported MAIL parameter: …",
                 "555 5.5.4 Unsupported RCPT parameter: …",
                 "555 5.5.4 RCPT parameters not recognized",
                 "555 5.5.4 RCPT parameters need EHLO"),
        when="MAIL or RCPT carried a parameter relaywatch does not offer (it offers SIZE, BODY, SMTPUTF8, "
             "and DSN's RET, ENVID, NOTIFY, ORCPT), or RCPT parameters after HELO instead of EHLO.",
        client=("Use only the extensions the EHLO reply lists; greet with EHLO.",),
        relay=(_LOG,)),
    ClientReply(
        id="client.bad_parameter", code="5.5.4", smtp_code=501, title="Bad MAIL parameter",
        replies=("501 5.5.4 Bad MAIL parameters",
                 "501 5.5.4 Bad MAIL parameters (non-ASCII)",
                 "501 5.5.4 BODY must be 7BIT or 8BITMIME",
                 "501 5.5.4 SIZE must be a number",
                 "501 5.5.4 SMTPUTF8 takes no value",
                 "501 5.5.4 Parameter … given twice"),
        when="A parameter relaywatch offers has a value it cannot take.",
        client=("A client bug: the reply names the parameter.",),
        relay=(_LOG,)),
    ClientReply(
        id="client.bad_dsn_parameter", code="5.5.4", smtp_code=501, title="Bad DSN parameter",
        replies=("501 5.5.4 RET must be FULL or HDRS",
                 "501 5.5.4 ENVID needs a value",
                 "501 5.5.4 ENVID is longer than … characters",
                 "501 5.5.4 NOTIFY=NEVER cannot be combined with other values",
                 "501 5.5.4 NOTIFY takes NEVER, or a list of SUCCESS, FAILURE and DELAY",
                 "501 5.5.4 NOTIFY names a value twice",
                 "501 5.5.4 ORCPT is longer than … characters",
                 "501 5.5.4 ORCPT must be addr-type;address (rfc822;user@example.com)",
                 "501 5.5.4 … is not valid xtext (printable ASCII; '+' only as +XX with two upper-case "
                 "hex digits; no '=')",
                 "501 5.5.4 … must decode to printable ASCII"),
        when="A DSN parameter (RFC 3461: RET, ENVID on MAIL; NOTIFY, ORCPT on RCPT) is not as the RFC writes it.",
        client=("A client bug: the reply names the parameter and the rule.",),
        relay=(_LOG,)),
    ClientReply(
        id="client.message_too_big", code="5.3.4", smtp_code=552, title="Message too big",
        replies=("552 5.3.4 Message too big (the limit is … bytes)",),
        when="MAIL's SIZE, or the message itself after the final dot, is over server.max_message_size.",
        client=("Send smaller attachments (or a link); the limit is in the reply and in EHLO's SIZE.",),
        relay=("Raise server.max_message_size if the destinations accept larger messages.",)),
    # -- the protocol --------------------------------------------------------------------
    ClientReply(
        id="client.syntax", code="5.5.4", smtp_code=501, title="Command syntax error",
        replies=("501 5.5.4 Syntax: EHLO hostname",
                 "501 5.5.4 Syntax: HELO hostname",
                 "501 5.5.4 Syntax: MAIL FROM:<address>",
                 "501 5.5.4 Syntax: RCPT TO:<address>",
                 "501 5.5.4 Syntax: DATA",
                 "501 5.5.4 Syntax: STARTTLS"),
        when="A known command with a missing or extra argument.",
        client=("A client bug, or a script writing SMTP by hand: the reply shows the form.",),
        relay=("Nothing to do.",)),
    ClientReply(
        id="client.bad_command", code="5.5.2", smtp_code=500, title="Command not understood",
        replies=("500 5.5.2 Command not recognized: \"…\"",
                 "500 5.5.2 Empty command",
                 "500 5.5.2 Command line too long",
                 "500 5.5.2 NUL character in a command",
                 "500 5.5.2 A command that is not UTF-8 (SMTPUTF8 allows UTF-8 addresses only)",
                 "500 5.5.2 Non-ASCII characters are allowed only in MAIL and RCPT addresses (SMTPUTF8)"),
        when="A line that is not an SMTP command relaywatch knows, or breaks the line rules of RFC 5321.",
        client=("Often not an SMTP client at all (a port scanner, HTTP sent to port 25).",),
        relay=("Nothing to do; 20 of them close the session (client.too_many_errors).",)),
    ClientReply(
        id="client.bad_sequence", code="5.5.1", smtp_code=503, title="Command out of sequence",
        replies=("503 5.5.1 Send HELO or EHLO first",
                 "503 5.5.1 Send EHLO first",
                 "503 5.5.1 Sender already given (RSET starts over)",
                 "503 5.5.1 Need MAIL command",
                 "503 5.5.1 TLS is already active",
                 "503 5.5.1 Already authenticated",
                 "503 5.5.1 AUTH is not allowed during a mail transaction"),
        when="A command that is valid, but not at this point of the session.",
        client=("A client bug: the reply says what has to come first.",),
        relay=("Nothing to do.",)),
    ClientReply(
        id="client.not_offered", code="5.5.1", smtp_code=502, title="Command not offered",
        replies=("502 5.5.1 EXPN is not offered",
                 "502 5.5.1 BDAT is not offered (CHUNKING is not advertised)"),
        when="EXPN, or BDAT without the CHUNKING extension (relaywatch does not offer it).",
        client=("Use DATA; do not expand lists through the relay.",),
        relay=("Nothing to do.",)),
    ClientReply(
        id="client.bare_line_ending", code="5.6.11", smtp_code=554, title="Bare CR or LF in the message",
        replies=("554 5.6.11 Bare CR or LF in message; lines must end with CRLF",),
        when="The message had a CR or LF that is not part of CRLF (what SMTP smuggling uses).",
        client=("Send lines ending in CRLF: usually an application writing LF-only text to the socket.",),
        relay=("Refused on purpose, for every client.",)),
    ClientReply(
        id="client.nul_in_message", code="5.6.0", smtp_code=554, title="NUL character in the message",
        replies=("554 5.6.0 NUL character in message",),
        when="The message contained a NUL byte.",
        client=("Encode binary content (base64 attachments) before sending.",),
        relay=("Refused on purpose, for every client.",)),
)
