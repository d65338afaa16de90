"""A fake Oakestra System Manager over real HTTP, for testing FLOps' Oakestra deployer without a cluster.

Same paths, bodies and status codes as the real one (``/work/shared/oakestra-api.md`` §1-2, §7), requests handled
one at a time like its single sync gunicorn worker. Instances follow scripted status timelines chosen by a
regular expression on the service name; tests drive and inspect it through ``/__fake/*``:

- ``POST /__fake/scripts {"match", "script" | "steps" [+ "loop_from"], "polls_per_step"}``
- ``POST /__fake/tick {"n"}``, ``POST /__fake/faults {"method", "path", "status", "body", "times"}``
- ``POST /__fake/clusters [...]``, ``POST /__fake/tokens/expire``, ``POST /__fake/rr_conflicts {"times"}``
- ``POST /__fake/config {"app_get_null"}``, ``GET /__fake/calls``

With ``--run-podman`` each instance its script brings to RUNNING runs for real as a podman container
(:mod:`flops.oakestra.fake_podman`), which then decides its status.

Run it alone with ``python -m flops.oakestra.fake --port N``, or in-process with :class:`FakeSystemManager`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog

from flops.logs import configure as configure_logs
from flops.oakestra.fake_podman import PodmanRunner
from flops.oakestra.fake_state import SCRIPTS, FakeState, Fault, Script, ScriptRule, cluster_doc

log = structlog.get_logger(__name__)

NAME = re.compile(r"^[a-zA-Z0-9]{1,30}$")
# Paths the real System Manager only knows with a trailing slash: without it, Flask answers 308.
SLASHED = {"/api/application", "/api/applications", "/api/service", "/api/clusters"}


class Answer:
    """A response: status, body and how to encode it (``dj``: a JSON string holding JSON; ``html``: raw JSON
    labelled text/html)."""

    def __init__(self, status: int, body: Any = None, *, dj: bool = False, html: bool = False) -> None:
        self.status, self.body, self.dj, self.html = status, body, dj, html

    def encode(self) -> tuple[bytes, str]:
        if self.body is None and self.status == 204:
            return b"", "application/json"
        text = json.dumps(self.body)
        if self.dj:
            text = json.dumps(text)
        return text.encode(), "text/html; charset=utf-8" if self.html else "application/json"


def abort(status: int) -> Answer:
    """flask-smorest's abort(): the message passed in code is dropped, only code and reason remain."""
    return Answer(status, {"code": status, "status": HTTPStatus(status).phrase})


class FakeApi:
    """Routes one request to :class:`FakeState`; called with the server's lock held."""

    def __init__(self, state: FakeState) -> None:
        self.state = state

    def handle(self, method: str, path: str, headers: dict[str, str], body: Any) -> Answer:
        if path.startswith("/__fake/"):
            return self.control(method, path, body)
        fault = self.state.take_fault(method, path)
        if fault is not None:
            return Answer(fault.status, fault.body)
        if path in SLASHED:
            return Answer(308, None)
        if path == "/api/auth/login" and method == "POST":
            if not isinstance(body, dict):
                return abort(403)
            tokens = self.state.login(str(body.get("username")), str(body.get("password")))
            return Answer(200, tokens) if tokens else abort(401)
        if path.startswith("/api/clusters/"):
            active = [c for c in self.state.clusters if c.get("active", True)]
            return Answer(200, active if path == "/api/clusters/active" else self.state.clusters, html=True)
        token = headers.get("authorization", "").removeprefix("Bearer ").strip() or None
        verdict, user = self.state.token_state(token)
        if path.startswith(("/api/application", "/api/applications")):
            if user is None:  # flask_jwt_extended's @jwt_required
                if verdict == "invalid":
                    return Answer(422, {"msg": "Signature verification failed"})
                msg = "Token has expired" if verdict == "expired" else "Missing Authorization Header"
                return Answer(401, {"msg": msg})
            return self.applications(method, path, user, body)
        m = re.fullmatch(r"/api/user/([^/]+)", path)
        if m and method == "GET":
            if user is None:
                return Answer(401, {"message": "Missing authentication token"})
            if m[1] != user:
                return abort(403)
            roles = ["Admin"] if user in self.state.admins else ["Application_Provider"]
            return Answer(200, {"_id": {"$oid": self.state.user_ids[user]}, "name": user, "roles": roles}, dj=True)
        if path.startswith(("/api/service", "/api/services")):
            if user is None:  # Oakestra's @jwt_auth_required: one body for every cause
                return Answer(401, {"message": "Missing authentication token"})
            return self.services(method, path, user, body)
        return abort(404)

    # --- applications ---------------------------------------------------------------------------------------

    def applications(self, method: str, path: str, user: str, body: Any) -> Answer:
        s = self.state
        if path == "/api/applications/" and method == "GET":
            if user not in s.admins:
                return Answer(403, {"message": "You have not enough permissions!"})
            return Answer(200, s.user_apps(user), dj=True)
        m = re.fullmatch(r"/api/applications/([^/]+)", path)
        if m and method == "GET":
            if m[1] != s.user_ids.get(user):
                return abort(401)
            return Answer(200, s.user_apps(user), dj=True)
        if path == "/api/application/" and method == "POST":
            apps = _sla_apps(body)
            if apps is None:
                return abort(422)
            created = [s.create_app(user, a) for a in apps]
            if any(a is None for a in created):
                return abort(409)
            return Answer(200, s.user_apps(user), dj=True)
        m = re.fullmatch(r"/api/application/([^/]+)", path)
        if m and method == "GET":
            app = s.apps.get(m[1])
            if app is None or app["userId"] != user:
                return abort(404)
            return Answer(200, None if s.app_get_null else app, dj=not s.app_get_null)
        if m and method == "DELETE":
            return Answer(200, {"message": "Application Deleted"}) if s.delete_app(user, m[1]) else abort(501)
        return abort(404)

    # --- services -------------------------------------------------------------------------------------------

    def services(self, method: str, path: str, user: str, body: Any) -> Answer:
        s = self.state
        if path == "/api/service/" and method == "POST":
            return self.create_services(user, body)
        m = re.fullmatch(r"/api/service/([^/]+)/instance", path)
        if m and method == "POST":
            s.add_instance(m[1])
            return Answer(200, {"message": "ok"})
        m = re.fullmatch(r"/api/service/([^/]+)/instance/([^/]+)", path)
        if m and method == "DELETE":
            if not m[2].isdigit():
                return abort(500)
            s.delete_instance(m[1], int(m[2]))
            return Answer(200, {"message": "ok"})
        m = re.fullmatch(r"/api/services/([^/]+)", path)
        if m and method == "GET":
            app = s.apps.get(m[1])
            if app is None or app["userId"] != user:
                return abort(404)
            owned = [s.services[i] for i in dict.fromkeys(app["microservices"]) if i in s.services]
            docs = [s.service_doc(service) for service in owned]
            for service in owned:  # a poll moves the script on after answering: the first one sees REQUESTED
                s.poll(service)
            return Answer(200, docs, dj=True)
        m = re.fullmatch(r"/api/service/([^/]+)", path)
        if m:
            service = s.services.get(m[1])
            owner = s.apps.get(service.doc["applicationID"], {}).get("userId") if service else None
            if method == "GET":
                if service is None or owner != user:
                    return abort(404)
                doc = s.service_doc(service)
                s.poll(service)
                return Answer(200, doc, dj=True)
            if method == "DELETE":
                if service is None or owner != user:
                    return abort(500)
                s.delete_service(m[1])
                return Answer(200, {"message": "Job deleted"})
            if method == "PUT":
                return abort(501)
        return abort(404)

    def create_services(self, user: str, body: Any) -> Answer:
        s = self.state
        apps = _sla_apps(body)
        if not apps:
            return abort(400)
        app = s.apps.get(str(apps[0].get("applicationID")))
        services = apps[0].get("microservices")
        if app is None or app["userId"] != user or not services or not all(_valid_service(ms) for ms in services):
            return abort(400)
        job_id, deployed, failed = "", [], []
        for ms in services:
            job_id, accepted = s.create_service(app, ms)
            if accepted:
                deployed.append({"service_name": ms["microservice_name"], "status": 200})
            else:
                failed.append(
                    {"service_name": ms["microservice_name"], "message": "failed to deploy service", "status": 500}
                )
        return Answer(200, {"job_id": job_id, "deployed_services": deployed, "failed_services": failed})

    # --- test control ---------------------------------------------------------------------------------------

    def control(self, method: str, path: str, body: Any) -> Answer:
        s = self.state
        if path == "/__fake/calls" and method == "GET":
            return Answer(200, s.calls)
        if method != "POST":
            return abort(405)
        body = body if body is not None else {}
        if path == "/__fake/scripts":
            script = (
                SCRIPTS[body["script"]] if "script" in body else Script(tuple(body["steps"]), body.get("loop_from"))
            )
            s.rules.append(ScriptRule(re.compile(body["match"]), script, int(body.get("polls_per_step", 1))))
        elif path == "/__fake/tick":
            s.tick(int(body.get("n", 1)))
        elif path == "/__fake/faults":
            s.faults.append(
                Fault(body.get("method", "GET"), re.compile(body["path"]), int(body["status"]), body.get("body"),
                      int(body.get("times", 1)))
            )  # fmt: skip
        elif path == "/__fake/clusters":
            s.clusters = [cluster_doc(c, i) for i, c in enumerate(body)]
        elif path == "/__fake/tokens/expire":
            s.expire_tokens()
        elif path == "/__fake/rr_conflicts":
            s.rr_conflicts = int(body.get("times", 1))
        elif path == "/__fake/config":
            s.app_get_null = bool(body.get("app_get_null", s.app_get_null))
        else:
            return abort(404)
        return Answer(204)


def _sla_apps(body: Any) -> list[dict[str, Any]] | None:
    """The applications of an SLA v2.0 body when they pass the schema's name rules, else None."""
    if (
        not isinstance(body, dict)
        or body.get("sla_version") != "v2.0"
        or not isinstance(body.get("applications"), list)
    ):
        return None
    apps = body["applications"]
    for app in apps:
        if not isinstance(app, dict) or not isinstance(app.get("microservices"), list):
            return None
        if not all(NAME.fullmatch(str(app.get(k, ""))) for k in ("application_name", "application_namespace")):
            return None
    return apps


def _valid_service(ms: Any) -> bool:
    return (
        isinstance(ms, dict)
        and ms.get("microserviceID", "") == ""
        and all(NAME.fullmatch(str(ms.get(k, ""))) for k in ("microservice_name", "microservice_namespace"))
        and isinstance(ms.get("code"), str)
        and isinstance(ms.get("virtualization"), str)
    )


def _handler(api: FakeApi, lock: threading.Lock) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            headers = {k.lower(): v for k, v in self.headers.items()}
            with lock:  # one request at a time, like the real one's single sync worker
                answer = api.handle(self.command, self.path, headers, body)
                if not self.path.startswith("/__fake/"):
                    api.state.calls.append(
                        {"method": self.command, "path": self.path, "body": body, "t": api.state.clock(),
                         "status": answer.status, "response": answer.body}
                    )  # fmt: skip
            data, ctype = answer.encode()
            self.send_response(answer.status)
            if answer.status == 308:
                self.send_header("Location", self.path + "/")
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up waiting
                self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PUT = _serve

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("fake system manager request", line=format % args)

    return Handler


class FakeSystemManager:
    """The fake on ``host:port`` (0: a free port) in a background thread; ``url`` once started."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, state: FakeState | None = None) -> None:
        self.state = state or FakeState()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer((host, port), _handler(FakeApi(self.state), self.lock))
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeSystemManager:
        # A short poll interval: stop() waits for the serving loop to notice, once per test.
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-oakestra", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        if self.state.runner is not None:
            self.state.runner.stop_all()

    def __enter__(self) -> FakeSystemManager:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flops.oakestra.fake", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=10000)
    parser.add_argument(
        "--run-podman", action="store_true", help="run each RUNNING instance as a real podman container"
    )
    args = parser.parse_args(argv)
    configure_logs()
    state = FakeState(runner=PodmanRunner() if args.run_podman else None)
    fake = FakeSystemManager(args.host, args.port, state)
    # SIGTERM ends it like Ctrl-C: through the finally below, which stops the containers it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    log.info("fake oakestra system manager listening", url=fake.url)
    try:
        fake.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        fake.server.server_close()
        if state.runner is not None:
            state.runner.stop_all()


if __name__ == "__main__":
    main()
