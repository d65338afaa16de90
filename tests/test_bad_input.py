"""Bad input through a real broker: every malformed, unexpected or oversized message becomes an error the
sender can read, is logged, and the manager goes on answering the next valid request."""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path

import pytest

from flops import topics
from flops.bus import Bus, BusOptions
from flops.client import Client
from flops.messages import new_id
from flops.settings import BrokerAddress
from flops.sla import ProjectSLA
from tests.support import FakeWorkers, ManagerProcess, cli, make_git_repo, sla


class Listener:
    """Subscribes to the error topic and project event streams before the bad input is sent."""

    def __init__(self, broker: BrokerAddress, extra: list[str] | None = None) -> None:
        subs = [topics.errors(), topics.ALL_PROJECT_EVENTS, f"{topics.PREFIX}/customers/+/requests/+/reply"]
        self.bus = Bus(broker, BusOptions(client_id=new_id("test-listen"), subscriptions=subs + (extra or [])))
        self.bus.connect()

    def expect(self, topic_part: str, text: str, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self.bus.inbox.get(timeout=left)
            except queue.Empty:
                break
            if topic_part in message.topic and text in message.payload.decode(errors="replace"):
                return json.loads(message.payload)
        raise AssertionError(f"no message on *{topic_part}* containing {text!r} within {timeout} s")

    def close(self) -> None:
        self.bus.close()


@pytest.fixture
def listener(broker: BrokerAddress):
    lst = Listener(broker)
    yield lst
    lst.close()


def _still_answers(broker: BrokerAddress, tmp_path: Path) -> None:
    with Client(broker) as client:
        reply = client.submit(ProjectSLA.model_validate(sla("file:///nowhere")), timeout=10)
    assert reply.project_id and not reply.errors


@pytest.mark.parametrize(
    ("payload", "where", "text"),
    [
        (b"{not json", "errors", "invalid request"),
        (b"[1, 2, 3]", "errors", "invalid request"),
        (
            json.dumps({"request_id": "r-bad-schema", "sla": {"ml_repo_url": 5}}).encode(),
            "r-bad-schema/reply",
            "errors",
        ),
        (
            json.dumps({"request_id": "r-no-flavor", "sla": {"ml_repo_url": "file:///x"}}).encode(),
            "r-no-flavor/reply",
            "ml_model_flavor",
        ),
        (b"\xff\xfe\x00binary", "errors", "invalid request"),
    ],
)
def test_bad_requests_get_an_error_and_the_manager_goes_on(
    broker, manager: ManagerProcess, listener: Listener, tmp_path: Path, payload: bytes, where: str, text: str
) -> None:
    listener.bus.publish_wait(topics.requests("tests"), payload)
    listener.expect(where, text)
    _still_answers(broker, tmp_path)


def test_bad_reports_are_rejected_on_the_project_stream_or_the_error_topic(
    broker, manager: ManagerProcess, listener: Listener, tmp_path: Path
) -> None:
    workers = FakeWorkers(broker)
    try:
        workers.fleet(2)
        with Client(broker) as client:
            reply = client.submit(ProjectSLA.model_validate(sla(make_git_repo(tmp_path / "repo"))))
        project_id = reply.project_id
        assert project_id
        build = workers.next_command("build", timeout=60)
        reports = topics.agent_reports("node-x")
        # Malformed JSON, wrong schema, a kind nobody knows: no project can be read from them.
        workers.publish_raw(reports, b"{oops")
        listener.expect("errors", "invalid report")
        workers.publish_raw(reports, json.dumps({"kind": "round.completed", "event_id": "e1"}).encode())
        listener.expect("errors", "project_id: Field required")
        workers.publish_raw(
            reports,
            json.dumps({"kind": "made.up", "event_id": "e2", "project_id": project_id, "source": "x"}).encode(),
        )
        listener.expect("errors", "made.up")
        # Oversized payload (the manager's limit is 256 KiB).
        workers.publish_raw(reports, b"{" + b" " * (300 * 1024) + b"}")
        listener.expect("errors", "exceeds")
        # A report for a project nobody knows.
        workers.publish_raw(
            reports,
            json.dumps({"kind": "build.started", "event_id": "e4", "project_id": "p-unknown", "source": "x"}).encode(),
        )
        listener.expect("errors", "unknown project p-unknown")
        # An event for a finished project.
        with Client(broker) as client:
            client.cancel(project_id, "done testing")
        listener.expect(f"{project_id}/events", "cancelled")
        workers.report(build, "build.started", event_id="e5")
        listener.expect(f"{project_id}/events", "finished project")
        # A report from an agent the named command was not sent to: refused, the project's stream untouched.
        workers.publish_raw(
            reports,
            json.dumps(
                {
                    "kind": "build.started",
                    "event_id": "e6",
                    "project_id": project_id,
                    "source": "x",
                    "command_id": build.command_id,
                }
            ).encode(),
        )
        listener.expect("errors", "sent no such command")
        # A cancel that is not JSON, for a project that does not exist.
        workers.publish_raw(topics.project_cancel("tests", "p-ghost"), b"nope")
        listener.expect("errors", "p-ghost")
    finally:
        workers.close()
    _still_answers(broker, tmp_path)
    assert manager.proc is not None and manager.proc.poll() is None


def test_bad_agent_status_is_rejected_and_ignored(
    broker, manager: ManagerProcess, listener: Listener, tmp_path: Path
) -> None:
    listener.bus.publish_wait(topics.agent_status("weird"), b'{"agent_id": "weird", "online": "maybe"}')
    listener.expect("errors", "invalid agent status")
    _still_answers(broker, tmp_path)


def _reply_errors(reply: dict) -> dict[str, str]:
    return {e["field"]: e["message"] for e in reply.get("errors") or []}


def test_oversize_request_is_answered_on_its_reply_topic(broker, manager: ManagerProcess, listener: Listener) -> None:
    body = {"request_id": "r-oversize", "sla": sla("file:///x") | {"customerID": "x" * (300 * 1024)}}
    listener.bus.publish_wait(topics.requests("tests"), json.dumps(body).encode())
    errors = _reply_errors(listener.expect("r-oversize/reply", "exceeds"))
    assert "exceeds 262144" in errors["payload"], errors


def test_deeply_nested_request_is_answered_on_its_response_topic(
    broker, manager: ManagerProcess, listener: Listener, tmp_path: Path
) -> None:
    # The MQTT 5 response topic wins over the default reply topic when the sender names one.
    response_topic = topics.request_reply("tests", new_id("t"))
    listener.bus.subscribe([response_topic])
    payload = b'{"request_id": "r-deep", "sla": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    listener.bus.publish(topics.requests("tests"), payload, response_topic=response_topic)
    errors = _reply_errors(listener.expect(response_topic, "nested deeper"))
    assert errors["sla"].startswith("nested deeper than"), errors
    _still_answers(broker, tmp_path)


def test_reused_request_id_with_another_sla_is_refused(broker, manager: ManagerProcess, tmp_path: Path) -> None:
    first = ProjectSLA.model_validate(sla("file:///nowhere"))
    other = ProjectSLA.model_validate(sla("file:///elsewhere"))
    with Client(broker) as client:
        created = client.submit(first, request_id="r-reused", timeout=10)
        again = client.submit(first, request_id="r-reused", timeout=10)
        refused = client.submit(other, request_id="r-reused", timeout=10)
    assert created.project_id and not created.errors
    assert again.duplicate and again.project_id == created.project_id
    assert refused.project_id is None
    assert refused.errors and refused.errors[0].field == "request_id", refused
    assert created.project_id in refused.errors[0].message


def test_cli_refuses_oversize_and_deep_files_before_publishing(broker, tmp_path: Path) -> None:
    # No manager runs: the CLI must answer by itself, with field errors and exit 1, never a traceback.
    big = tmp_path / "big.json"
    big.write_text(json.dumps(sla("file:///x", data_tags=[f"tag{i:06d}" for i in range(30_000)])))
    deep = tmp_path / "deep.json"
    deep.write_text('{"sla": ' + "[" * 5000 + "]" * 5000 + "}")
    for path, text in ((big, "exceeds 262144"), (deep, "nested deeper than")):
        result = cli(broker, "project", "submit", str(path), "--timeout", "2")
        assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
        assert text in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
