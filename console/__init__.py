"""The operator console: web pages over the daemon's Redis contracts (`inspectd console`).

A separate process from the worker. It reads verdicts, cached frames, drift states, events and the model
registry, and writes only operator confirmations (and their event) and, for admins, registry activations.
Who did what comes from the login, never from a form.
"""
