"""Which FLOps agents the Oakestra adapter stands in for, derived from the clusters Oakestra reports active.

The stages pick agents from the registry by role, data tags and cluster; on Oakestra there are no agents, so the
adapter announces *seats* instead: per active cluster one seat ``oak-<cluster>`` that takes builds (when the
cluster offers ``image-builder``), aggregators and model servers, and learns when the cluster offers
``FLOps-learner``; plus one more learner seat ``oak-<cluster>-<n>`` per further node offering ``FLOps-learner``
(``supported_addons`` repeats an add-on once per node), so a project wanting N learners finds N seats. A seat's
``cluster`` is the Oakestra cluster name: hierarchical projects get one FLOps cluster per Oakestra cluster, and
every actor started on a seat is sent to that cluster as a ``direct`` constraint. A seat's ``host`` is a name
(``<seat>.oakestra``) the adapter replaces by the service IP of the aggregator a command points at: where a
learner finds its aggregator inside Oakestra is only known per project and port.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flops.messages import AgentRole, AgentStatus
from flops.oakestra.models import Cluster

LEARNER_ADDON = "FLOps-learner"
BUILDER_ADDON = "image-builder"
PREFIX = "oak-"
HOST_SUFFIX = ".oakestra"


@dataclass(frozen=True)
class Seat:
    """One agent the adapter announces: its id, the Oakestra cluster its actors go to, what it may run."""

    agent_id: str
    cluster: str
    roles: tuple[AgentRole, ...]
    cpus: int | None = None
    memory_mb: int | None = None

    def status(self, *, online: bool, data_tags: Mapping[str, int]) -> AgentStatus:
        """The seat's retained agent status; only learner seats claim the configured data."""
        learner = "learner" in self.roles
        return AgentStatus(
            agent_id=self.agent_id,
            online=online,
            roles=list(self.roles),
            data_tags=dict(data_tags) if learner else {},
            cluster=self.cluster,
            host=f"{self.agent_id}{HOST_SUFFIX}",
            cpus=self.cpus,
            memory_mb=self.memory_mb,
        )


def seat_id(cluster: str, n: int = 1) -> str:
    """``oak-<cluster>`` for a cluster's first seat, ``oak-<cluster>-<n>`` for its further learner seats; characters
    an agent id may not hold become ``_``."""
    safe = re.sub(r"[^A-Za-z0-9_.:\-]", "_", cluster)[:100] or "_"
    return f"{PREFIX}{safe}" if n == 1 else f"{PREFIX}{safe}-{n}"


def seats(clusters: Sequence[Cluster]) -> list[Seat]:
    """The seats of the active clusters, ordered by cluster name then seat number (repeatable)."""
    out: list[Seat] = []
    for cluster in sorted((c for c in clusters if c.active), key=lambda c: c.name):
        learner_nodes = cluster.supported_addons.count(LEARNER_ADDON)
        roles: list[AgentRole] = ["aggregator", "serve"]
        if BUILDER_ADDON in cluster.supported_addons:
            roles.append("builder")
        if learner_nodes:
            roles.append("learner")
        size = {"cpus": int(cluster.vcpus) or None, "memory_mb": int(cluster.memory) or None}
        out.append(Seat(seat_id(cluster.name), cluster.name, tuple(roles), **size))
        out += [Seat(seat_id(cluster.name, n), cluster.name, ("learner",), **size) for n in range(2, learner_nodes + 1)]
    return out
