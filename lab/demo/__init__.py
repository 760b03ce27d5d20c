"""`inspectd demo`: the whole loop on one machine, from a camera to a recovered line.

It starts a local Kafka-protocol broker (Tansu) and Redis (lab/services.py), prepares a CS-Flow model
on the real ELPV solar cells (trained once, then reused from `OUT/model`), starts one worker
(`inspectd run`) and a simulated camera, and switches a domain shift on. The demo then plays the operator:
when the worker raises a drift alarm it confirms a few of the newest frames that are truly normal (the
camera knows the ground truth of every frame id), the worker adapts, gates and activates a new version,
and the line recovers. The worker is a black box here: it is configured through the environment and
watched only through Redis (the verdicts and events streams), like any dashboard would.

What happens is printed live (one status line a second, one line per event); at the end a summary per
phase (before the shift, shifted under the source version, after the new version) goes to
`OUT/summary.json` and a picture of the run to `OUT/timeline.png`. Everything started is stopped, on
errors and Ctrl-C too.
"""
