"""Which broker identity each project's actors on Oakestra report with, kept in step with the broker.

The adapter asks :meth:`ActorIdentities.for_command` before it places an actor: the project's identity is made
on its first actor (a random password) and allowed the reports of every seat one of its commands goes to. The
identity goes when the project's application does (:meth:`drop`). A restarted adapter has no memory: it
learns each adopted project's password from its services' environment (:meth:`adopt`, which makes the client
again should the broker have lost it) and deletes the identities of projects that have no application any more
(:meth:`prune`). A deletion the broker did not take is tried again at the next :meth:`retry`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog

from flops.errors import FlopsError
from flops.oakestra import dynsec
from flops.oakestra.dynsec import DynSec

log = structlog.get_logger(__name__)


@dataclass
class _Project:
    password: str = field(repr=False)
    seats: set[str] = field(default_factory=set)


class ActorIdentities:
    """Per-project actor identities on a broker with the dynamic-security plugin, made through ``admin``."""

    def __init__(self, admin: DynSec) -> None:
        self.admin = admin
        self.projects: dict[str, _Project] = {}
        self._drops_due: set[str] = set()

    def start(self) -> None:
        self.admin.connect()

    def close(self) -> None:
        self.admin.close()

    def for_command(self, project_id: str, seat_id: str) -> tuple[str, str]:
        """(username, password) an actor of ``project_id`` on ``seat_id`` reports with; raises :class:`FlopsError`
        when the broker does not take it (the command then fails: its actor could not report)."""
        project = self.projects.get(project_id)
        if project is None:
            project = _Project(dynsec.new_password())
            self.admin.ensure_project(project_id, project.password)
            self.projects[project_id] = project
            self._drops_due.discard(project_id)
        if seat_id not in project.seats:
            self.admin.allow_seat(project_id, seat_id)
            project.seats.add(seat_id)
        return dynsec.username(project_id), project.password

    def adopt(self, project_id: str, password: str, seat_ids: Iterable[str]) -> None:
        """Follow a project an earlier adapter made the identity of: same password, same seats."""
        project = _Project(password)
        self.admin.ensure_project(project_id, password)
        for seat_id in sorted(set(seat_ids)):
            self.admin.allow_seat(project_id, seat_id)
            project.seats.add(seat_id)
        self.projects[project_id] = project

    def drop(self, project_id: str) -> None:
        """The project's application is gone: so is its identity (now, or at a later :meth:`retry`)."""
        self.projects.pop(project_id, None)
        try:
            self.admin.delete_project(project_id)
        except FlopsError as exc:
            log.warning("actor identity not deleted; tried again later", project_id=project_id, error=str(exc)[:300])
            self._drops_due.add(project_id)
            return
        self._drops_due.discard(project_id)

    def prune(self, keep: Iterable[str]) -> list[str]:
        """Delete the identities of every project but ``keep`` (those an earlier adapter left behind); which."""
        stale = sorted(set(self.admin.projects()) - set(keep))
        for project_id in stale:
            self.drop(project_id)
        return stale

    def retry(self) -> None:
        for project_id in sorted(self._drops_due):
            self.drop(project_id)
