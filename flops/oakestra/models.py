"""The System Manager's documents as typed objects: applications, services with their instances, clusters.

Converted once, at the client's edge; unknown fields are ignored because the real documents carry many
(resource histories, logs) that FLOps does not use.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Doc(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)


def _oid(value: object) -> object:
    """``_id`` is ``{"$oid": "<24 hex>"}`` in double-encoded bodies and a plain string in cluster lists."""
    if isinstance(value, dict) and "$oid" in value:
        return value["$oid"]
    return value


class Application(_Doc):
    """One Oakestra application (a FLOps project); ``service_ids`` may repeat an id (upserted services)."""

    id: str = Field(alias="applicationID")
    name: str = Field(alias="application_name")
    namespace: str = Field(alias="application_namespace")
    service_ids: list[str] = Field(default_factory=list, alias="microservices")


class Instance(_Doc):
    """One instance of a service as the root last saw it (snapshots every 15 s: steps may be skipped)."""

    number: int = Field(alias="instance_number")
    status: str = ""
    status_detail: str | None = None
    cluster_id: str | None = None
    worker_id: str | None = None
    host_ip: str | None = None
    publicip: str | None = None


class Service(_Doc):
    """One Oakestra service (a FLOps actor). ``status`` is the last event of any instance: aggregate
    ``instances`` instead when there are several."""

    id: str = Field(alias="microserviceID")
    name: str = Field(alias="microservice_name")
    application_id: str = Field(alias="applicationID")
    status: str = ""
    status_detail: str | None = None
    image: str = Field(default="", alias="code")
    cmd: list[str] = Field(default_factory=list)
    environment: list[str] = Field(default_factory=list)
    memory: int = 0
    vcpus: int = 0
    one_shot: bool = False
    rr_ip: str | None = Field(default=None, alias="RR_ip")
    constraints: list[dict[str, object]] = Field(default_factory=list)
    instances: list[Instance] = Field(default_factory=list, alias="instance_list")

    @field_validator("status", mode="before")
    @classmethod
    def _status_text(cls, value: object) -> object:
        return "" if value is None else value


class Cluster(_Doc):
    """One cluster of ``GET /api/clusters/active``; ``supported_addons`` repeats an addon once per node."""

    id: str = Field(alias="_id")
    name: str = Field(alias="cluster_name")
    active: bool = True
    supported_addons: list[str] = Field(default_factory=list)
    vcpus: float = 0
    memory: float = 0  # MB available, summed over the cluster's nodes
    active_nodes: int = 0

    @field_validator("id", mode="before")
    @classmethod
    def _plain_id(cls, value: object) -> object:
        return _oid(value)
