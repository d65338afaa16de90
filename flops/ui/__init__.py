"""``flops ui``: a read-only web view of every project, built only from what the broker tells its subscriber.

:mod:`flops.ui.view` folds retained states, project events and agent statuses into per-project views;
:mod:`flops.ui.feed` is the MQTT subscriber feeding it; :mod:`flops.ui.sessions` gives each logged-in person
their own subscriber with their own broker credentials; :mod:`flops.ui.app` serves pages, JSON and
server-sent events (Starlette). The browser side is plain JavaScript and SVG in ``static/`` (no build step).
"""
