"""Watch: incidents over what was recorded (rules.py, pure), the monitor that reads the facts and
acts (monitor.py), probes, alerts to admins and Fix now; docs/architecture.md, "Watch"."""
