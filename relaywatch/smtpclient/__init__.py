"""The SMTP client conversation, sans-I/O: bytes in, events out, commands to bytes, with the
transition tables in states.py; deliver/transport.py is the I/O loop that drives it."""
