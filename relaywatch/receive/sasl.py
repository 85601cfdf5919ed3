"""The SASL exchange of AUTH PLAIN and LOGIN (RFC 4954), without I/O.

The conversation (receive/conversation.py) checks that AUTH may be given at
all, then hands the exchange the client's lines: the initial response on the
AUTH line, then each answer to a 334.  It gives back the ``Reply`` to send, or
the ``Authenticate`` with the user name and password for the caller to check;
``done`` says the exchange is over either way.
"""

from __future__ import annotations

import base64
import binascii

from relaywatch.receive.conversation_events import Authenticate, Reply

# Replies to AUTH the caller sends once it has checked the password (RFC 4954 6).
AUTH_SUCCEEDED = "235 2.7.0 Authentication successful"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
AUTH_UNAVAILABLE = "454 4.7.0 Temporary authentication failure; try again later"
MECHANISMS = ("PLAIN", "LOGIN")
# RFC 4954 4: a SASL response line may be up to 12288 octets; PLAIN and LOGIN
# never need more than a command line, so the command limit applies.
_LOGIN_USERNAME, _LOGIN_PASSWORD = "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6"    # "Username:", "Password:"


class SaslExchange:
    def __init__(self, mechanism: str):
        self.mechanism = mechanism         # one of MECHANISMS
        self.username: str | None = None   # LOGIN: the answer to "Username:"
        self.done = False

    def start(self, initial: str) -> Reply | Authenticate:
        """The AUTH line's initial response ("" if none)."""
        if not initial:
            return Reply("334 " if self.mechanism == "PLAIN" else _LOGIN_USERNAME)
        # RFC 4954 4: "=" is an initial response that is empty.
        return self.respond(b"" if initial == "=" else initial.encode("ascii"), initial=True)

    def respond(self, raw: bytes | str, initial: bool = False) -> Reply | Authenticate:
        """The client's answer to a 334 (or the initial response on the AUTH line)."""
        if isinstance(raw, str):            # too long
            self.done = True
            return Reply("500 5.5.6 Authentication exchange line is too long")
        if raw.strip() == b"*" and not initial:
            self.done = True
            return Reply("501 5.0.0 Authentication cancelled")
        try:
            decoded = base64.b64decode(raw.strip(), validate=True)
            text = decoded.decode("utf-8")
        except (binascii.Error, ValueError):
            self.done = True
            return Reply("501 5.5.2 Cannot decode the response (base64 of UTF-8 expected)")
        if self.mechanism == "PLAIN":
            parts = text.split("\0")
            self.done = True
            if len(parts) != 3 or not parts[1]:
                return Reply("501 5.5.2 Malformed PLAIN response (authzid NUL user NUL password)")
            authzid, username, password = parts
            if authzid and authzid != username:
                return Reply("535 5.7.8 Acting for another user (authorization identity) is not allowed")
            return Authenticate("PLAIN", username, password)
        if self.username is None:
            if not text:
                self.done = True
                return Reply("501 5.5.2 Empty user name")
            self.username = text
            return Reply(_LOGIN_PASSWORD)
        self.done = True
        return Authenticate("LOGIN", self.username, text)
