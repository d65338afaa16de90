"""The request bodies the original FLOps manager read, as the oak CLI sends them.

``POST /api/flops/projects`` carries a project SLA (:class:`flops.sla.ProjectSLA` already reads the original
files). ``POST /api/flops/mocks`` carries a mock-data SLA, modelled here after the original's
``MockDataProvider``: ``{"customerID", "mock_data_configuration": {"dataset_name", "number_of_partitions",
"data_tag"}}`` with the original's defaults (``mnist``, 1, the dataset's name). ``GET /api/flops/tracking``
and ``DELETE /api/flops/database`` carry ``{"customerID"}`` (the current oak CLI sends the tracking one as a
query parameter). Before each of them the oak CLI logs in (``POST /api/auth/login`` with ``{"username",
"password"}`` at Oakestra's system manager) and sends the token it gets back. Every SLA file of the oak CLI
names ``"customerID": "Admin"``, its default: here that means "the token's customer".
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from flops.data.mock import BUNDLED

ORIGINAL_DEFAULT_CUSTOMER = "Admin"
"""The customerID every oak CLI SLA file and request carries unless told otherwise."""

DATASET_ALIASES = {"mnist": "digits"}
"""Original dataset names served by a bundled stand-in (nothing is downloaded): MNIST's handwritten digits
become scikit-learn's 8x8 digits, same ``image``/``label`` columns."""


class MockDataConfiguration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_name: Annotated[str, Field(min_length=1, max_length=128)] = "mnist"
    number_of_partitions: Annotated[int, Field(ge=1, le=1000, strict=True)] = 1
    data_tag: Annotated[str, Field(max_length=128)] = ""
    # Dropped by the original's final model (its SLA files still carry it): accepted, without effect.
    one_mock_service_per_partition: bool = False

    @property
    def tag(self) -> str:
        return self.data_tag or self.dataset_name

    def bundled(self) -> str | None:
        """The bundled dataset this name stands for, or None (nothing here downloads datasets)."""
        name = DATASET_ALIASES.get(self.dataset_name, self.dataset_name)
        return name if name in BUNDLED else None


class MockDataSLA(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customerID: Annotated[str, Field(min_length=1, max_length=128)] = ORIGINAL_DEFAULT_CUSTOMER
    mock_data_configuration: MockDataConfiguration = MockDataConfiguration()


class Login(BaseModel):
    """``POST /api/auth/login``: what the oak CLI sends Oakestra's system manager for a token."""

    model_config = ConfigDict(extra="ignore")

    username: Annotated[str, Field(min_length=1, max_length=128)]
    password: Annotated[str, Field(min_length=1, max_length=1024)]


class CustomerQuery(BaseModel):
    """The body (or query) of the tracking and database requests."""

    model_config = ConfigDict(extra="ignore")

    customerID: Annotated[str, Field(min_length=1, max_length=128)] = ORIGINAL_DEFAULT_CUSTOMER
