"""The manager's view of agents, rebuilt from their retained status messages (never persisted)."""

from __future__ import annotations

from dataclasses import dataclass, field

from flops.messages import AgentStatus


@dataclass
class AgentRegistry:
    agents: dict[str, AgentStatus] = field(default_factory=dict)

    def update(self, status: AgentStatus) -> AgentStatus | None:
        """Record a status; returns the previous one."""
        previous = self.agents.get(status.agent_id)
        self.agents[status.agent_id] = status
        return previous

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
