"""The status strings Oakestra reports for services and instances, grouped by what a client must do about them.

Values exactly as ``oakestra_utils/types/statuses.py``; there is no ``SCHEDULED``.
"""

from __future__ import annotations

REQUESTED = "REQUESTED"
CLUSTER_SCHEDULED = "CLUSTER_SCHEDULED"
NODE_SCHEDULED = "NODE_SCHEDULED"
CREATING = "CREATING"
CREATED = "CREATED"
RUNNING = "RUNNING"
FAILED = "FAILED"
DEAD = "DEAD"
COMPLETED = "COMPLETED"
UNDEPLOYED = "UNDEPLOYED"

# The root scheduler's answers when it cannot place a service: final, Oakestra never retries them.
NEGATIVE = frozenset(
    {
        "TargetClusterNotFound",
        "TargetClusterNotActive",
        "TargetClusterNoCapacity",
        "NoActiveClusterWithCapacity",
        "NO_WORKER_CAPACITY",
        "NO_QUALIFIED_WORKER_FOUND",
        "NO_NODE_FOUND",
    }
)

# Deploy error (FAILED) or exit (DEAD): Oakestra's cluster manager redeploys these forever.
BROKEN = frozenset({FAILED, DEAD})

# Placed on a node, not yet reported running (CREATED only ever comes from the NodeEngine, kept for safety).
STARTING = frozenset({NODE_SCHEDULED, CREATING, CREATED})
