"""The shared lab queue: a store of users, quotas and jobs, a scheduler (priority, fair share, gangs,
backfill, preemption), a dispatcher to Ray's Job Submission API, and an HTTP API with a web page.

Start it with ``python -m labtrain.queue serve``; use it with ``labtrain submit/queue/show/logs/cancel``.
"""
