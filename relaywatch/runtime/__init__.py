"""The running server around the parts: its live config (config.py), the
delivery process it supervises (child.py), its pid file and signals
(control.py).  app.py builds the parts and runs them with these."""
