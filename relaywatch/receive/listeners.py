"""The listeners' kinds and their TLS contexts.

Three kinds of listener, each from its config key: ``server.listen`` (smtp),
``server.submission_listen`` (AUTH required) and ``server.submissions_listen``
(implicit TLS, RFC 8314).  The smtp port offers STARTTLS with the server's
certificate; the submission ports' context also asks for a client
certificate when ``server.tls_client_ca`` is set (certificate login,
receive/login.py).
"""

from __future__ import annotations

import ssl

SMTP, SUBMISSION, SUBMISSIONS = "smtp", "submission", "submissions"
LISTENER_KEYS = {SMTP: "listen", SUBMISSION: "submission_listen", SUBMISSIONS: "submissions_listen"}
# Connections the kernel holds for us to accept.  asyncio's default of 100 is
# too few for a burst: 1,000 connections at once left about 500 of them
# connected but never accepted, with no greeting, for as long as they waited
# (tests/integration/test_slowloris.py); a legitimate client caught in such a burst would
# hang like that too.  The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024
TLS_HANDSHAKE_TIMEOUT = 30


def tls_contexts(server) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(the smtp port's context, the submission ports' context) for ``[server]``; (None, None) without a certificate.

    Only the submission ports ask for a client certificate: on the smtp port a
    server's certificate from another CA would fail the handshake."""
    if not (server.tls_cert and server.tls_key):
        return None, None
    smtp = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    smtp.load_cert_chain(server.tls_cert, server.tls_key)
    if server.tls_client_ca is None:
        return smtp, smtp
    # Only this CA vouches for client certificates (not the system's store).
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(server.tls_cert, server.tls_key)
    ctx.load_verify_locations(cafile=str(server.tls_client_ca))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return smtp, ctx
