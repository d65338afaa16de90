"""The state of the fake System Manager: users' tokens, applications, services whose instances follow scripted
status timelines, clusters, injected faults and the call log.

Pure bookkeeping with no HTTP: :mod:`flops.oakestra.fake` serves it. Every method is called with the server's one
lock held (the real System Manager runs a single sync gunicorn worker), so nothing here locks.
"""

from __future__ import annotations

import itertools
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flops.oakestra import statuses as st
from flops.oakestra.fake_podman import Container, PodmanRunner, stop_containers

RR_IP = re.compile(r"^10\.30\.(\d{1,3})\.(\d{1,3})$")
TOKEN_LIFETIME = 600.0  # access tokens live 10 minutes


@dataclass(frozen=True)
class Script:
    """The statuses an instance goes through, one step at a time; after the last step it stays there, or goes
    back to ``loop_from`` (Oakestra's endless redeploy of failed instances). A negative scheduling status means
    the root could not place it: no instance entry, the service shows that status."""

    steps: tuple[str, ...]
    loop_from: int | None = None

    def status(self, step: int) -> str:
        if step < len(self.steps):
            return self.steps[step]
        if self.loop_from is None:
            return self.steps[-1]
        period = len(self.steps) - self.loop_from
        return self.steps[self.loop_from + (step - self.loop_from) % period]


_LOOP_START = (st.REQUESTED, st.NODE_SCHEDULED)
SCRIPTS: dict[str, Script] = {
    "ok": Script((st.CLUSTER_SCHEDULED, st.NODE_SCHEDULED, st.RUNNING)),
    "oneshot_ok": Script((st.CLUSTER_SCHEDULED, st.NODE_SCHEDULED, st.RUNNING, st.COMPLETED)),
    "sched_fail": Script(("NoActiveClusterWithCapacity",)),
    "stuck": Script((st.CLUSTER_SCHEDULED,)),
    "pull_fail": Script((st.CLUSTER_SCHEDULED, st.NODE_SCHEDULED, st.FAILED, *_LOOP_START), loop_from=2),
    "crash": Script((st.CLUSTER_SCHEDULED, st.NODE_SCHEDULED, st.RUNNING, st.DEAD, *_LOOP_START, st.RUNNING), 3),
    "oneshot_fail": Script((st.CLUSTER_SCHEDULED, st.NODE_SCHEDULED, st.RUNNING, st.DEAD, *_LOOP_START), loop_from=3),
}


@dataclass
class ScriptRule:
    """Services whose ``microservice_name`` matches ``pattern`` run ``script``, one step every ``polls_per_step``
    GETs of the service (0: only on ticks)."""

    pattern: re.Pattern[str]
    script: Script
    polls_per_step: int = 1


@dataclass
class Fault:
    """The next ``times`` calls of ``method`` on a path matching ``path`` are answered ``status`` + ``body``."""

    method: str
    path: re.Pattern[str]
    status: int
    body: Any
    times: int


@dataclass
class FakeInstance:
    number: int
    script: Script
    cluster: dict[str, Any] | None
    step: int = -1  # -1: REQUESTED, not yet in instance_list
    shown: bool = False  # in instance_list once placed; stays there through redeploys (REQUESTED again)
    container: Container | None = None  # --run-podman: from RUNNING on, the real container says
    reported: str = ""  # the status last folded into the service's

    @property
    def status(self) -> str:
        if self.container is not None:
            return self.container.status()
        return st.REQUESTED if self.step < 0 else self.script.status(self.step)


@dataclass
class FakeService:
    doc: dict[str, Any]
    rule: ScriptRule
    instances: list[FakeInstance] = field(default_factory=list)
    polls: int = 0
    status: str = ""
    status_detail: str = "Waiting for scheduling decision"


def default_clusters() -> list[dict[str, Any]]:
    return [cluster_doc({"cluster_name": "cluster1", "supported_addons": ["image-builder", "FLOps-learner"]}, 0)]


def cluster_doc(given: dict[str, Any], index: int) -> dict[str, Any]:
    """A cluster document of ``GET /api/clusters/active`` from the few fields a test gives."""
    doc = {
        "_id": given.get("_id") or f"c1c1{index:020x}",
        "cluster_name": "cluster1",
        "cluster_location": "0,0,100",
        "ip": "10.0.0.5",
        "port": "10100",
        "active": True,
        "active_nodes": 1,
        "vcpus": 8,
        "total_cpu_cores": 8,
        "memory": 16000,
        "memory_in_mb": 16000,
        "cpu_percent": 10.0,
        "memory_percent": 30.0,
        "virtualization": ["docker"],
        "supported_addons": [],
        "csi_drivers": [],
    }
    doc.update(given)
    doc["candidate_name"] = doc["cluster_name"]
    return doc


class FakeState:
    """Everything the fake System Manager knows. ``clock`` is wall-clock seconds (token expiry, call log)."""

    def __init__(
        self,
        *,
        users: dict[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        runner: PodmanRunner | None = None,
        admins: frozenset[str] = frozenset({"Admin"}),
    ) -> None:
        self.users = users or {"Admin": "Admin"}
        self.admins = admins  # may list their applications at GET /api/applications/
        self.user_ids = {name: f"5e5e{n:020x}" for n, name in enumerate(self.users)}  # their Mongo ids
        self.clock = clock
        self.runner = runner
        self._ids = itertools.count(1)
        # Mongo-like ids, unique across fakes: the podman runner names containers after them, and two fakes on
        # one host (a demo beside a test) must not fight over a name.
        self._id_prefix = secrets.token_hex(4)
        self.tokens: dict[str, tuple[str, float]] = {}  # token -> (user, expiry)
        self.apps: dict[str, dict[str, Any]] = {}
        self.services: dict[str, FakeService] = {}
        self.rr_ips: dict[str, str] = {}  # ip -> job_name holding it
        self.clusters = default_clusters()
        self.rules: list[ScriptRule] = []
        self.faults: list[Fault] = []
        self.rr_conflicts = 0  # the next n service creations are refused whatever their IP
        self.app_get_null = True  # A4's bug: 200 `null` on success
        self.calls: list[dict[str, Any]] = []

    def new_id(self) -> str:
        return f"6b0b{self._id_prefix}{next(self._ids):012x}"

    # --- auth ---------------------------------------------------------------------------------------------------

    def login(self, username: str, password: str) -> dict[str, str] | None:
        if self.users.get(username) != password:
            return None
        token, refresh = f"t{self.new_id()}", f"r{self.new_id()}"
        self.tokens[token] = (username, self.clock() + TOKEN_LIFETIME)
        return {"token": token, "refresh_token": refresh}

    def token_state(self, token: str | None) -> tuple[str, str | None]:
        """("ok", user), ("missing", None), ("expired", None) or ("invalid", None)."""
        if not token:
            return "missing", None
        entry = self.tokens.get(token)
        if entry is None:
            return "invalid", None
        if entry[1] <= self.clock():
            return "expired", None
        return "ok", entry[0]

    def expire_tokens(self) -> None:
        now = self.clock()
        self.tokens = {t: (user, min(exp, now)) for t, (user, exp) in self.tokens.items()}

    # --- faults and scripts -------------------------------------------------------------------------------------

    def take_fault(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.method == method and fault.path.fullmatch(path) and fault.times > 0:
                fault.times -= 1
                return fault
        return None

    def rule_for(self, name: str) -> ScriptRule:
        for rule in reversed(self.rules):  # the latest matching rule wins
            if rule.pattern.search(name):
                return rule
        return ScriptRule(re.compile(""), SCRIPTS["oneshot_ok" if name.startswith("builder") else "ok"])

    # --- applications -------------------------------------------------------------------------------------------

    def user_apps(self, user: str) -> list[dict[str, Any]]:
        return [app for app in self.apps.values() if app["userId"] == user]

    def create_app(self, user: str, given: dict[str, Any]) -> dict[str, Any] | None:
        """The new application, or None when (name, namespace) exists for this user (409)."""
        name, ns = given["application_name"], given["application_namespace"]
        if any(a["application_name"] == name and a["application_namespace"] == ns for a in self.user_apps(user)):
            return None
        app_id = self.new_id()
        app = {
            "applicationID": app_id,
            "application_name": name,
            "application_namespace": ns,
            "application_desc": given.get("application_desc", ""),
            "microservices": [],
            "userId": user,
            "_id": {"$oid": app_id},
        }
        self.apps[app_id] = app
        return app

    def delete_app(self, user: str, app_id: str) -> bool:
        app = self.apps.get(app_id)
        if app is None or app["userId"] != user:
            return False
        service_ids = list(dict.fromkeys(app["microservices"]))
        # Their containers first, all at once (a stopped container's stop is a no-op in delete_service).
        services = [self.services[s] for s in service_ids if s in self.services]
        stop_containers(i.container for service in services for i in service.instances if i.container is not None)
        for service_id in service_ids:
            self.delete_service(service_id)
        del self.apps[app_id]
        return True

    # --- services -----------------------------------------------------------------------------------------------

    def create_service(self, app: dict[str, Any], ms: dict[str, Any]) -> tuple[str, bool]:
        """(service id, accepted). Refused (False) when its round-robin IP is invalid or held by another job."""
        name = ms["microservice_name"]
        job_name = f"{app['application_name']}.{app['application_namespace']}.{name}.{ms['microservice_namespace']}"
        rr_ip = (ms.get("addresses") or {}).get("rr_ip")
        if self.rr_conflicts > 0 or (rr_ip and not self._rr_ip_free(rr_ip, job_name)):
            self.rr_conflicts = max(0, self.rr_conflicts - 1)
            return self.new_id(), False  # the real one deletes the failed service but may still name its id
        existing = next(
            (s for s in self.services.values() if s.doc["job_name"] == job_name), None
        )  # same name in the same app: an upsert keeping the id, appended to the app once more
        service_id = existing.doc["microserviceID"] if existing else self.new_id()
        doc = {
            **ms,
            "_id": {"$oid": service_id},
            "microserviceID": service_id,
            "job_name": job_name,
            "applicationID": app["applicationID"],
            "app_name": app["application_name"],
            "app_ns": app["application_namespace"],
            "service_name": name,
            "service_ns": ms["microservice_namespace"],
            "virtualization": "docker" if ms.get("virtualization") == "container" else ms.get("virtualization"),
            "image": ms.get("code"),
            "RR_ip": rr_ip,
            "RR_ip_v6": None,
            "one_shot": bool(ms.get("one_shot", False)),
            "next_instance_progressive_number": 0,
        }
        if existing:
            existing.doc.update(doc)
        else:
            self.services[service_id] = FakeService(doc, self.rule_for(name))
        if rr_ip:
            self.rr_ips[rr_ip] = job_name
        app["microservices"].append(service_id)
        return service_id, True

    def _rr_ip_free(self, ip: str, job_name: str) -> bool:
        m = RR_IP.fullmatch(ip)
        if not m or not all(0 <= int(part) <= 255 for part in m.groups()):
            return False
        return self.rr_ips.get(ip, job_name) == job_name

    def add_instance(self, service_id: str) -> None:
        service = self.services.get(service_id)
        if service is None:
            return  # S4 answers ok for unknown ids too
        number = service.doc["next_instance_progressive_number"]
        service.doc["next_instance_progressive_number"] = number + 1
        service.instances.append(FakeInstance(number, service.rule.script, self._place(service.doc)))
        service.status = st.REQUESTED

    def _place(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        """The cluster the root scheduler would pick: the `direct` one if active, else any with capacity."""
        wanted = next((c.get("cluster") for c in doc.get("constraints") or [] if c.get("type") == "direct"), None)
        for cluster in self.clusters:
            if wanted and cluster["cluster_name"] != wanted:
                continue
            if cluster["memory"] >= (doc.get("memory") or 0) and cluster["vcpus"] >= (doc.get("vcpus") or 0):
                return cluster
        return None

    def advance(self, service: FakeService, steps: int = 1) -> None:
        for _ in range(steps):
            for instance in service.instances:
                instance.step += 1
                status = instance.status
                if instance.cluster is None and status not in st.NEGATIVE:
                    # No cluster fits: what the Go root scheduler answers, for good.
                    instance.script = Script(("NoActiveClusterWithCapacity",))
                    instance.step = 0
                    status = instance.status
                if self.runner and status == st.RUNNING and instance.container is None:
                    instance.container = self.runner.start(service.doc, instance.number)
                instance.shown = instance.shown or status not in st.NEGATIVE | {st.REQUESTED}
                self._record(service, instance, status)

    def _record(self, service: FakeService, instance: FakeInstance, status: str) -> None:
        """Service status = the last instance event, but RUNNING only once every instance runs."""
        instance.reported = status
        if status == st.RUNNING and any(i.status != st.RUNNING for i in self.visible(service)):
            return
        service.status = status
        if status in st.NEGATIVE:
            service.status_detail = "Waiting for scheduling decision"

    def visible(self, service: FakeService) -> list[FakeInstance]:
        return [i for i in service.instances if i.shown and i.status not in st.NEGATIVE]

    def tick(self, n: int) -> None:
        for service in self.services.values():
            self.advance(service, n)

    def poll(self, service: FakeService) -> None:
        """One GET of the service: the scripted steps advance every ``polls_per_step`` GETs."""
        service.polls += 1
        every = service.rule.polls_per_step
        if every > 0 and service.polls % every == 0:
            self.advance(service)

    def service_doc(self, service: FakeService) -> dict[str, Any]:
        for inst in service.instances:  # containers change on their own: fold what they did since
            if inst.container is not None and inst.status != inst.reported:
                self._record(service, inst, inst.status)
        instances = []
        for inst in self.visible(service):
            cluster = inst.cluster or {}
            entry: dict[str, Any] = {
                "instance_number": inst.number,
                "cluster_id": cluster.get("_id"),
                "cluster_location": cluster.get("cluster_location"),
                "status": inst.status,
                "status_detail": inst.container.detail() if inst.container else _detail(inst.status, service.doc),
            }
            if inst.container is not None:
                entry["logs"] = inst.container.logs()[-1000:]
            if inst.status != st.CLUSTER_SCHEDULED:
                entry.update(
                    worker_id=f"{cluster.get('cluster_name', 'c')}-node1",
                    host_ip="192.168.1.9",
                    host_port=50011,
                    publicip="192.168.1.9",
                )
            instances.append(entry)
        return {
            **service.doc,
            "status": service.status,
            "status_detail": service.status_detail,
            "instance_list": instances,
        }

    def delete_instance(self, service_id: str, number: int) -> None:
        service = self.services.get(service_id)
        if service is not None:
            for inst in service.instances:
                if inst.number == number and inst.container is not None:
                    inst.container.stop()
            service.instances = [i for i in service.instances if i.number != number]

    def delete_service(self, service_id: str) -> bool:
        service = self.services.pop(service_id, None)
        if service is None:
            return False
        stop_containers(inst.container for inst in service.instances if inst.container is not None)
        self.rr_ips = {ip: job for ip, job in self.rr_ips.items() if job != service.doc["job_name"]}
        app = self.apps.get(service.doc["applicationID"])
        if app is not None:
            app["microservices"] = [s for s in app["microservices"] if s != service_id]
        return True


def _detail(status: str, doc: dict[str, Any]) -> str:
    if status == st.FAILED:
        return f"failed to pull image {doc.get('code')}: not found"
    if status == st.DEAD:
        return "task exited with code 1"
    return "No extra information"
