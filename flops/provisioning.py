"""Provisioned agents: which agent ids exist and which roles each was granted.

``flops setup production`` writes ``agents.json`` (``{"agents": {"node-1": {"roles": ["learner"]}}}``) and the
manager reads it (``FLOPS_AGENTS_FILE``). The broker's ACL already binds an agent's topics to its username;
this adds what the ACL cannot say: a status from an agent nobody provisioned, or claiming a role it was not
granted, is refused, so a customer cannot announce a made-up agent and be picked as builder or aggregator.
Without a file (development) every agent id and role is accepted.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from flops.errors import ConfigError
from flops.messages import AgentRole, AgentStatus


class _Grant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    roles: list[AgentRole]


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agents: dict[str, _Grant]


class AgentPolicy:
    def __init__(self, grants: dict[str, frozenset[str]]) -> None:
        self.grants = grants

    @classmethod
    def load(cls, path: Path) -> AgentPolicy:
        try:
            parsed = _File.model_validate_json(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"agents file {path}: {exc.strerror}") from exc
        except ValidationError as exc:
            raise ConfigError(f"agents file {path}: {exc.errors()[0]['msg']}") from exc
        return cls({agent_id: frozenset(grant.roles) for agent_id, grant in parsed.agents.items()})

    def refusal(self, status: AgentStatus) -> str | None:
        """Why this status is refused, or None."""
        granted = self.grants.get(status.agent_id)
        if granted is None:
            return f"agent {status.agent_id} is not provisioned"
        invented = sorted(set(status.roles) - granted)
        if invented:
            return f"agent {status.agent_id} claims roles it was not granted: {', '.join(invented)}"
        return None
