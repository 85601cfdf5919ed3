"""The relaywatch exception tree.

    RelaywatchError
      ConfigError        an invalid setting; .problems lists one line per key
      StoreError         the queue store failed (driver errors are wrapped in store/*)
        StoreFull        ...because the disk (or quota) under it is full
        LeaseLost        our lease on a queue entry was taken over (we were too slow)
      UnknownEntry       no queue entry with that id
      LeaseFenced        this node may no longer act on a lease (its heartbeat was late): a delivery stops
      ProtocolError      an SMTP conversation went wrong (smtpclient/); never raised itself
        LocalProtocolError   we misused the conversation (a command out of its state): our bug
        RemoteProtocolError  the server sent something that is not SMTP
      AlertNotSent       an alert channel (mail, webhook) did not take a notification (watch/alerts.py)

Delivery failures are not exceptions that travel far: the transport turns what
it saw into an ``Observation`` (deliver/observe.py) and classify/ maps it to a
catalog entry.
"""


class RelaywatchError(Exception):
    """Base of every error relaywatch raises on purpose."""


class ConfigError(RelaywatchError):
    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class StoreError(RelaywatchError):
    """The queue store could not do what was asked; nothing was half-done.

    ``code``: the driver's name for the failure when it has one (``SQLITE_IOERR``,
    a PostgreSQL SQLSTATE), for the one log line an outage gets."""

    def __init__(self, message: str = "", code: str | None = None):
        super().__init__(message)
        self.code = code


class StoreFull(StoreError):
    """The disk or quota under the store is full (SQLITE_FULL, PostgreSQL 53100 disk_full):
    the receiver answers ``452 4.3.1``, not ``451 4.3.0``."""


class LeaseLost(StoreError):
    """The entry's lease expired and another worker may have it."""


class StaleTerm(StoreError):
    """A leader-only write by a node whose leader term is over (another node leads now)."""


class LeaseFenced(RelaywatchError):
    """This node may no longer act on the lease it delivers under: its heartbeat was late and the
    lease is another node's now (cluster/fence.py).  Raised before the final dot of DATA, so the
    destination drops the transaction; the entry is neither recorded nor delivered by this node."""


class UnknownEntry(RelaywatchError):
    def __init__(self, entry_id: str):
        super().__init__(f"no queued message with id {entry_id}")
        self.entry_id = entry_id


class ProtocolError(RelaywatchError):
    """An SMTP conversation broke its rules; the leaves say whose fault it was (h11's split)."""


class LocalProtocolError(ProtocolError):
    """We asked the conversation for something its state does not allow: a bug of ours."""


class RemoteProtocolError(ProtocolError):
    """The server sent something that is not an SMTP reply, or not at that point."""


class AlertNotSent(RelaywatchError):
    """An alert channel did not take a notification; the message says why, in one line (what
    ``incidents show`` prints as the notification's last error).  The notification is retried."""
