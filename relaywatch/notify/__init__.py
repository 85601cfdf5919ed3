"""Notify: the notices an attempt calls for (RFC 3464 NDRs, delay and success notices) and the
RFC 8460 TLS reports, built as messages to queue.  Pure; docs/architecture.md, "Notify"."""
