"""The manager's view of agents, rebuilt from their retained status messages (never persisted).

Bounded: at most ``max_agents`` entries. When full, the offline agent heard from longest ago makes room for a
newcomer; when every known agent is online, the newcomer is refused (the caller reports why).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flops.messages import AgentStatus


@dataclass(frozen=True)
class Registration:
    """What recording one status did: the previous status, or why it was refused, and who was evicted."""

    previous: AgentStatus | None = None
    refused: str | None = None
    evicted: str | None = None

    @property
    def accepted(self) -> bool:
        return self.refused is None


@dataclass
class AgentRegistry:
    agents: dict[str, AgentStatus] = field(default_factory=dict)
    max_agents: int = 10_000
    # Offline agents, least recently heard from first (a dict keeps insertion order; re-inserting moves to the end).
    _offline: dict[str, None] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._offline = {a.agent_id: None for a in self.agents.values() if not a.online}

    def update(self, status: AgentStatus) -> Registration:
        """Record a status; evicts the longest-unheard offline agent, or refuses, when the registry is full."""
        agent_id = status.agent_id
        previous = self.agents.get(agent_id)
        evicted = None
        if previous is None and len(self.agents) >= self.max_agents:
            if not self._offline:
                return Registration(refused=f"agent registry full: {self.max_agents} agents, all online")
            evicted = next(iter(self._offline))
            del self._offline[evicted]
            del self.agents[evicted]
        self.agents[agent_id] = status
        self._offline.pop(agent_id, None)
        if not status.online:
            self._offline[agent_id] = None
        return Registration(previous=previous, evicted=evicted)

    def online(self, role: str | None = None) -> list[AgentStatus]:
        return sorted(
            (a for a in self.agents.values() if a.online and (role is None or role in a.roles)),
            key=lambda a: a.agent_id,
        )

    def learners_for(self, tags: list[str], cluster: str | None = None) -> list[AgentStatus]:
        """Online learner agents holding rows of at least one of ``tags`` (any learner when no tags)."""
        out = []
        for agent in self.online("learner"):
            if cluster is not None and agent.cluster != cluster:
                continue
            if not tags or any(agent.data_tags.get(t, 0) > 0 for t in tags):
                out.append(agent)
        # Most data first, so the picked learners hold the most examples.
        return sorted(out, key=lambda a: (-sum(a.data_tags.get(t, 0) for t in tags), a.agent_id))

    def get(self, agent_id: str) -> AgentStatus | None:
        return self.agents.get(agent_id)
