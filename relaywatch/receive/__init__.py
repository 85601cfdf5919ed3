"""Receive: the SMTP server, from the first byte to the 250 that follows a durable commit;
its modules in docs/architecture.md, "Receive"."""
