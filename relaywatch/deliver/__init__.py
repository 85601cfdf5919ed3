"""Deliver: one attempt at one destination behind the Connector seam (connector.py), and the
queue manager that leases, dispatches and records (scheduler.py, record.py, queue_actions.py);
its modules in docs/architecture.md, "Schedule" and "Deliver"."""
