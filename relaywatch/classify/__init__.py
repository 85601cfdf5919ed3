"""Classify: what a delivery attempt observed, turned into one catalog code, and what follows it
(the retry decision).  Pure; its modules in docs/architecture.md, "Classify"."""
