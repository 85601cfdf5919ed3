"""relaywatch: an SMTP smart-host relay that never loses mail and explains why it is stuck."""

__version__ = "0.1.0"
