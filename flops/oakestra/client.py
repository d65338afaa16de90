"""A client of Oakestra's System Manager REST API: what FLOps needs to run actors as Oakestra services.

It hides the API's quirks (see ``/work/shared/oakestra-api.md``): access tokens that expire after 10 minutes and
two shapes of authentication error, double-encoded JSON bodies, paths whose trailing slash matters, a 409 on a
re-created application, a service "created" with status 200 while its round-robin IP was refused, and deletes of
what is already gone answered with 500/501. Every call has a timeout; a refusal is a :class:`SystemManagerError`
carrying the method, path, status and body.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import structlog

from flops.errors import FlopsError
from flops.oakestra.models import Application, Cluster, Service

log = structlog.get_logger(__name__)

NAME = re.compile(r"^[a-zA-Z0-9]{1,30}$")  # application and service names and namespaces (SLA v2.0 schema)
TOKEN_RELOGIN_AFTER = 8 * 60.0  # access tokens live 10 min: log in again before, not only after a 401
RR_IP_ATTEMPTS = 5  # a random 10.30.x.y collides rarely; more attempts would hide a broken net plugin


class SystemManagerError(FlopsError):
    """The System Manager refused a call or could not be reached (``status`` None)."""

    def __init__(self, method: str, path: str, status: int | None, body: Any) -> None:
        super().__init__(f"Oakestra {method} {path}: {status if status is not None else 'unreachable'} {body!r}")
        self.method = method
        self.path = path
        self.status = status
        self.body = body


class InvalidName(FlopsError, ValueError):
    """An application or service name Oakestra would refuse (``^[a-zA-Z0-9]{1,30}$``)."""

    def __init__(self, what: str, name: str) -> None:
        super().__init__(f"{what} {name!r} is not 1-30 letters or digits")
        self.what = what
        self.name = name


class ServiceRejected(FlopsError):
    """Every attempt to create a service ended in ``failed_services`` (its round-robin IP refused each time)."""

    def __init__(self, name: str, attempts: int, rr_ips: Sequence[str]) -> None:
        super().__init__(f"Oakestra refused service {name} {attempts} times (round-robin IPs {', '.join(rr_ips)})")
        self.name = name
        self.attempts = attempts
        self.rr_ips = list(rr_ips)


@dataclass(frozen=True)
class Credentials:
    """Who FLOps logs in as; Oakestra's default account unless told otherwise."""

    username: str = "Admin"
    password: str = field(default="Admin", repr=False)
    organization: str | None = None


@dataclass(frozen=True)
class ServiceSpec:
    """What one Oakestra service runs and where: the fields of an SLA v2.0 microservice that FLOps sets."""

    name: str
    image: str
    cmd: Sequence[str] = ()
    environment: Sequence[str] = ()  # "K=V"
    memory: int = 1000  # MB
    vcpus: int = 1
    one_shot: bool = False
    cluster: str | None = None  # sent as a `direct` constraint, the only kind the Go scheduler honours
    addons: Sequence[str] = ()  # also sent as an `addons` constraint, for stacks older than the Go scheduler
    namespace: str = "flops"
    privileged: bool = False

    def microservice(self, rr_ip: str) -> dict[str, Any]:
        constraints: list[dict[str, Any]] = []
        if self.cluster:
            constraints.append({"type": "direct", "cluster": self.cluster})
        if self.addons:
            constraints.append({"type": "addons", "needs": list(self.addons)})
        return {
            "microserviceID": "",
            "microservice_name": self.name,
            "microservice_namespace": self.namespace,
            "virtualization": "container",
            "code": self.image,
            "cmd": list(self.cmd),
            "environment": list(self.environment),
            "memory": self.memory,
            "vcpus": self.vcpus,
            "storage": 0,
            "one_shot": self.one_shot,
            "privileged": self.privileged,
            "addresses": {"rr_ip": rr_ip},
            "constraints": constraints,
        }


def check_name(what: str, name: str) -> str:
    if not NAME.fullmatch(name):
        raise InvalidName(what, name)
    return name


def decode(text: str) -> Any:
    """A body as JSON, decoded twice when the first pass yields a string (the System Manager's double-encoded
    lists and documents); non-JSON text stays text."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def token_refused(status: int, body: Any) -> bool:
    """Whether a 401/422 came from the authentication decorators (expired, missing, unverifiable token) rather than
    from the endpoint: theirs carry ``msg`` (flask_jwt_extended) or ``message`` (Oakestra's own), ``abort()``'s
    carry ``code``."""
    return status in (401, 422) and isinstance(body, dict) and ("msg" in body or "message" in body)


def random_rr_ip(rng: random.Random) -> str:
    """A round-robin IP in 10.30.0.0/16 (there is no API to reserve one; a conflict is answered and retried)."""
    return f"10.30.{rng.randrange(0, 256)}.{rng.randrange(1, 255)}"


class SystemManager:
    """One logged-in session with a System Manager at ``base_url`` (e.g. ``http://root:10000``).

    ``clock`` (monotonic seconds) decides when the token is old enough to log in again; ``rng`` draws round-robin
    IPs; ``transport`` lets a caller route the HTTP calls (httpx's transports).
    """

    def __init__(
        self,
        base_url: str,
        credentials: Credentials | None = None,
        *,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.credentials = credentials or Credentials()
        self.clock = clock
        self.rng = rng or random.Random()
        self._token: str | None = None
        self._token_at = 0.0
        self._user_id: str | None = None  # the user's Mongo id, for listing applications without the Admin role
        # Redirects followed: /api/applications → 308 /api/applications/ keeps method and body.
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, follow_redirects=True, transport=transport)
        self.log = log.bind(system_manager=self.base_url, user=self.credentials.username)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SystemManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------------------------------------

    def login(self) -> None:
        """``POST /api/auth/login``; keeps the access token for the following calls."""
        body: dict[str, str] = {"username": self.credentials.username, "password": self.credentials.password}
        if self.credentials.organization:
            body["organization_name"] = self.credentials.organization
        status, answer = self._send("POST", "/api/auth/login", body, token=None)
        if status != 200 or not isinstance(answer, dict) or not answer.get("token"):
            raise SystemManagerError("POST", "/api/auth/login", status, answer)
        self._token = str(answer["token"])
        self._token_at = self.clock()
        self.log.info("oakestra login")

    def call(self, method: str, path: str, body: Any = None, *, auth: bool = True) -> tuple[int, Any]:
        """One API call: (status, decoded body). Logs in first when the token is missing or old, and once more
        when the answer says the token was refused. Raises only for what no answer could fix (unreachable)."""
        if not auth:
            return self._send(method, path, body, token=None)
        if self._token is None or self.clock() - self._token_at > TOKEN_RELOGIN_AFTER:
            self.login()
        status, answer = self._send(method, path, body, token=self._token)
        if token_refused(status, answer):
            self.log.info("oakestra token refused, logging in again", method=method, path=path, answer=answer)
            self.login()
            status, answer = self._send(method, path, body, token=self._token)
        return status, answer

    def _send(self, method: str, path: str, body: Any, *, token: str | None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            response = self._http.request(method, path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise SystemManagerError(method, path, None, str(exc)) from exc
        # /api/clusters/* answer text/html with raw JSON: parse the text whatever the type says.
        answer = decode(response.text)
        self.log.debug("oakestra call", method=method, path=path, status=response.status_code)
        return response.status_code, answer

    def _expect(
        self, method: str, path: str, body: Any = None, *, ok: Sequence[int] = (200,), auth: bool = True
    ) -> Any:
        status, answer = self.call(method, path, body, auth=auth)
        if status not in ok:
            raise SystemManagerError(method, path, status, answer)
        return answer

    def _sla(self, application: dict[str, Any]) -> dict[str, Any]:
        # customerID is ignored by Oakestra (the owner is the token's user); sent because the schema requires it.
        return {"sla_version": "v2.0", "customerID": self.credentials.username, "applications": [application]}

    # --- applications -----------------------------------------------------------------------------------------

    def applications(self) -> list[Application]:
        """Every application of the logged-in user: ``GET /api/applications/`` for an Admin; for anyone else
        (403 there) ``GET /api/applications/<their user id>``, the id read from ``GET /api/user/<name>``."""
        status, answer = self.call("GET", "/api/applications/")
        if status == 403:
            if self._user_id is None:
                user = self._expect("GET", f"/api/user/{self.credentials.username}")
                oid = user.get("_id") if isinstance(user, dict) else None
                self._user_id = str(oid.get("$oid") if isinstance(oid, dict) else oid)
            answer = self._expect("GET", f"/api/applications/{self._user_id}")
        elif status != 200:
            raise SystemManagerError("GET", "/api/applications/", status, answer)
        return [Application.model_validate(doc) for doc in answer or []]

    def find_application(self, name: str, namespace: str = "flops") -> Application | None:
        for app in self.applications():
            if app.name == name and app.namespace == namespace:
                return app
        return None

    def create_application(self, name: str, namespace: str = "flops", description: str = "") -> Application:
        """Create an empty application, or return the existing one of that name (409: made by an earlier run)."""
        check_name("application name", name)
        check_name("application namespace", namespace)
        body = self._sla(
            {
                "applicationID": "",
                "application_name": name,
                "application_namespace": namespace,
                "application_desc": description,
                "microservices": [],
            }
        )
        status, answer = self.call("POST", "/api/application/", body)
        if status == 409:
            existing = self.find_application(name, namespace)
            if existing is None:  # deleted between the two calls: a bug elsewhere, not something to retry blindly
                raise SystemManagerError("POST", "/api/application/", status, answer)
            self.log.info("oakestra application exists, reusing it", application=name, application_id=existing.id)
            return existing
        if status != 200 or not isinstance(answer, list):
            raise SystemManagerError("POST", "/api/application/", status, answer)
        # The answer lists all the caller's applications: ours is the one with this name.
        for doc in answer:
            app = Application.model_validate(doc)
            if app.name == name and app.namespace == namespace:
                self.log.info("oakestra application created", application=name, application_id=app.id)
                return app
        raise SystemManagerError("POST", "/api/application/", status, answer)

    def delete_application(self, application_id: str) -> bool:
        """Delete an application and, by cascade, its services. False when it was already gone (501)."""
        return self._delete(f"/api/application/{application_id}", (404, 501), application_id=application_id)

    # --- services ---------------------------------------------------------------------------------------------

    def create_service(self, application: Application, spec: ServiceSpec, rr_ip: str | None = None) -> str:
        """Create one service in ``application``; its id. A refused round-robin IP (a 200 with ``failed_services``)
        is retried with another random one in 10.30/16, at most :data:`RR_IP_ATTEMPTS` times."""
        check_name("service name", spec.name)
        check_name("service namespace", spec.namespace)
        tried: list[str] = []
        for _ in range(RR_IP_ATTEMPTS):
            ip = rr_ip if rr_ip and not tried else random_rr_ip(self.rng)
            tried.append(ip)
            body = self._sla(
                {
                    "applicationID": application.id,
                    "application_name": application.name,
                    "application_namespace": application.namespace,
                    "application_desc": "",
                    "microservices": [spec.microservice(ip)],
                }
            )
            answer = self._expect("POST", "/api/service/", body)
            if not isinstance(answer, dict):
                raise SystemManagerError("POST", "/api/service/", 200, answer)
            if any(s.get("service_name") == spec.name for s in answer.get("failed_services") or []):
                # The failed service was deleted by Oakestra although its id may be in job_id: never use that id.
                self.log.warning("oakestra refused service, new round-robin IP", service=spec.name, rr_ip=ip)
                continue
            service_id = str(answer.get("job_id") or "")
            if not service_id:
                raise SystemManagerError("POST", "/api/service/", 200, answer)
            self.log.info("oakestra service created", service=spec.name, service_id=service_id, rr_ip=ip)
            return service_id
        raise ServiceRejected(spec.name, len(tried), tried)

    def service(self, service_id: str) -> Service | None:
        """One service with its instances (``GET /api/service/<id>``); None when it does not exist."""
        status, answer = self.call("GET", f"/api/service/{service_id}")
        if status == 404:
            return None
        if status != 200 or not isinstance(answer, dict):
            raise SystemManagerError("GET", f"/api/service/{service_id}", status, answer)
        return Service.model_validate(answer)

    def services(self, application_id: str) -> list[Service]:
        """Every service of an application (``GET /api/services/<appId>``)."""
        answer = self._expect("GET", f"/api/services/{application_id}")
        return [Service.model_validate(doc) for doc in answer or []]

    def deploy_instance(self, service_id: str) -> None:
        """Ask for one more instance (always answered ok, even for an unknown id: check the instance list)."""
        self._expect("POST", f"/api/service/{service_id}/instance")

    def delete_instance(self, service_id: str, number: int) -> None:
        self._expect("DELETE", f"/api/service/{service_id}/instance/{number}")

    def delete_service(self, service_id: str) -> bool:
        """Undeploy every instance and delete the service. False when it was already gone (500)."""
        return self._delete(f"/api/service/{service_id}", (404, 500), service_id=service_id)

    def _delete(self, path: str, gone: tuple[int, ...], **ident: str) -> bool:
        """DELETE ``path``: True when deleted, False when the System Manager says it was already gone (its
        ``gone`` codes differ per resource), SystemManagerError otherwise."""
        status, answer = self.call("DELETE", path)
        if status in gone:
            return False
        if status != 200:
            raise SystemManagerError("DELETE", path, status, answer)
        self.log.info("oakestra resource deleted", path=path, **ident)
        return True

    # --- clusters ---------------------------------------------------------------------------------------------

    def active_clusters(self) -> list[Cluster]:
        """Clusters that reported in the last 30 s (``GET /api/clusters/active``, unauthenticated)."""
        answer = self._expect("GET", "/api/clusters/active", auth=False)
        return [Cluster.model_validate(doc) for doc in answer or []]
