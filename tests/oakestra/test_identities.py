"""ActorIdentities against a recording stand-in for the broker's control API: one identity per project, one ACL
per seat, a deletion the broker refused tried again, identities of unknown projects pruned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flops.errors import FlopsError
from flops.oakestra import dynsec
from flops.oakestra.adapter import from_settings
from flops.oakestra.dynsec import DynSecError
from flops.oakestra.identities import ActorIdentities
from flops.settings import BrokerAddress, Settings


class RecordingAdmin:
    """What a DynSec would send, recorded; ``failing`` commands raise as a broker that did not answer."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.clients: dict[str, str] = {}
        self.failing: set[str] = set()

    def _call(self, *call: Any) -> None:
        if call[0] in self.failing:
            raise DynSecError(call[0], "no answer within 10.0 s")
        self.calls.append(call)

    def ensure_project(self, project_id: str, password: str) -> None:
        self._call("ensure", project_id)
        self.clients[project_id] = password

    def allow_seat(self, project_id: str, seat_id: str) -> None:
        self._call("allow", project_id, seat_id)

    def delete_project(self, project_id: str) -> None:
        self._call("delete", project_id)
        self.clients.pop(project_id, None)

    def projects(self) -> list[str]:
        return sorted(self.clients)


@pytest.fixture
def admin() -> RecordingAdmin:
    return RecordingAdmin()


@pytest.fixture
def identities(admin: RecordingAdmin) -> ActorIdentities:
    return ActorIdentities(admin)  # type: ignore[arg-type]


def test_a_project_gets_one_identity_and_one_acl_per_seat(admin: RecordingAdmin, identities: ActorIdentities) -> None:
    first = identities.for_command("p1", "oak-a")
    assert identities.for_command("p1", "oak-a") == first == (dynsec.username("p1"), admin.clients["p1"])
    identities.for_command("p1", "oak-b")
    other = identities.for_command("p2", "oak-a")

    assert other[1] != first[1]
    assert admin.calls == [
        ("ensure", "p1"), ("allow", "p1", "oak-a"), ("allow", "p1", "oak-b"), ("ensure", "p2"), ("allow", "p2", "oak-a")
    ]  # fmt: skip


def test_an_identity_the_broker_did_not_make_is_made_at_the_next_command(
    admin: RecordingAdmin, identities: ActorIdentities
) -> None:
    admin.failing.add("allow")
    with pytest.raises(FlopsError):
        identities.for_command("p1", "oak-a")
    admin.failing.clear()

    identities.for_command("p1", "oak-a")

    assert admin.calls[-1] == ("allow", "p1", "oak-a")


def test_a_deletion_the_broker_did_not_take_is_tried_again(admin: RecordingAdmin, identities: ActorIdentities) -> None:
    identities.for_command("p1", "oak-a")
    admin.failing.add("delete")
    identities.drop("p1")
    assert admin.projects() == ["p1"] and "p1" not in identities.projects
    admin.failing.clear()

    identities.retry()
    identities.retry()  # done once: nothing more

    assert admin.projects() == [] and admin.calls.count(("delete", "p1")) == 1


def test_adopting_keeps_the_password_and_seats_and_prune_deletes_the_rest(
    admin: RecordingAdmin, identities: ActorIdentities
) -> None:
    admin.clients = {"p1": "old", "gone": "x"}

    identities.adopt("p1", "held-by-its-services", ["oak-b", "oak-a"])
    stale = identities.prune(keep={"p1"})

    assert stale == ["gone"] and admin.clients == {"p1": "held-by-its-services"}
    assert identities.for_command("p1", "oak-a") == (dynsec.username("p1"), "held-by-its-services")
    assert admin.calls[1] == ("allow", "p1", "oak-a") and admin.calls.count(("allow", "p1", "oak-a")) == 1


def _settings(tmp_path: Path, **extra: Any) -> Settings:
    return Settings(deployer="oakestra", oakestra_url="http://127.0.0.1:1", data_dir=tmp_path, **extra)


def test_the_manager_makes_per_project_identities_only_with_a_whole_admin_identity(tmp_path: Path) -> None:
    address = BrokerAddress(host="127.0.0.1", port=1883, username="manager", password="m")
    with pytest.raises(ValueError, match="go together"):
        from_settings(_settings(tmp_path, oakestra_dynsec_username="flops-dynsec"), address)

    shared = from_settings(_settings(tmp_path, oakestra_actor_username="actor", oakestra_actor_password="a"), address)
    own = from_settings(
        _settings(tmp_path / "2", oakestra_dynsec_username="flops-dynsec", oakestra_dynsec_password="d"), address
    )
    try:
        assert shared.identities is None and shared.config.actors.broker_username == "actor"
        assert own.identities is not None
        assert (own.identities.admin.bus.address.username, own.identities.admin.bus.address.password) == (
            "flops-dynsec",
            "d",
        )
    finally:
        for adapter in (shared, own):  # never started: only what the constructor opened
            adapter.outbox.close()
            adapter.sm.close()
