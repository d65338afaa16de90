"""``flops api``: the HTTP surface the Oakestra CLI (``oak addon flops …``) speaks, as a thin adapter to MQTT.

The original FLOps manager answered ``/api/flops/{projects,mocks,tracking,database}`` over HTTP. Here those
requests are turned into what ``flops project submit``, ``flops data mock``, the tracking setting and
``flops project prune`` do: :mod:`flops.api.tokens` maps a bearer token to a customer and that customer's
broker identity, :mod:`flops.api.original` holds the original request bodies the oak CLI sends,
:mod:`flops.api.actions` does the work (blocking, one short-lived MQTT client per request),
:mod:`flops.api.app` is the Starlette application and :mod:`flops.api.serve` runs it with uvicorn.
"""
