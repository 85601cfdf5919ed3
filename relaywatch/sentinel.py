"""A named marker, as h11 has them: ``NEED_DATA`` of both SMTP conversations (receive/ and
smtpclient/), ``SEND_BODY`` and the like.  Compared with ``is``; its repr is its name."""


class Sentinel:
    """A named marker (h11's sentinels): compare with ``is``."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name
