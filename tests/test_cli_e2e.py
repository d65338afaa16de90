"""End to end through a real broker and a real manager process: the CLI submits, the test plays the workers,
``flops project watch`` follows the project to its end."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support import FakeWorkers, ManagerProcess, cli, cli_background, make_git_repo, sla

ALL_STAGES = ["preparation", "start", "builder", "learners", "aggregation", "post_training", "finished"]


def _submit(broker, tmp_path: Path, body: dict) -> str:
    file = tmp_path / "project.json"
    file.write_text(json.dumps(body))
    done = cli(broker, "project", "submit", str(file))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _watch_lines(proc) -> list[dict]:
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"watch did not end; it printed:\n{out}") from None
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_submit_and_watch_until_completed(broker, manager: ManagerProcess, tmp_path: Path) -> None:
    workers = FakeWorkers(broker, auto=True)
    try:
        # No agents yet: the project waits in preparation until watch is attached, so watch sees every stage.
        project_id = _submit(broker, tmp_path, sla(make_git_repo(tmp_path / "repo")))
        assert project_id.startswith("p-")
        watch = cli_background(broker, "project", "watch", project_id, "--json")
        assert watch.stdout is not None
        first = json.loads(watch.stdout.readline())  # the retained state: watch is subscribed
        assert first["type"] == "state" and first["stage"] == "preparation"
        workers.fleet(2)
        lines = _watch_lines(watch)
        assert watch.returncode == 0
    finally:
        workers.close()
    changes = [line["message"] for line in lines if line.get("kind") == "stage.changed"]
    assert changes == [
        "preparation -> start",
        "start -> builder",
        "builder -> learners",
        "learners -> aggregation",
        "aggregation -> post_training",
        "post_training -> finished: completed (model served at http://127.0.0.1:9/)",
    ]
    rounds = [line["data"]["round"] for line in lines if line.get("kind") == "round.completed"]
    assert rounds == [1, 2, 3]
    final = [line for line in lines if line["type"] == "state"][-1]
    assert final["outcome"] == "completed"
    assert list(final["stage_timestamps"]) == [f"{s}_at" for s in ALL_STAGES]
    assert final["progress"]["round"] == 3 and final["model_url"] == "http://127.0.0.1:9/"

    status = cli(broker, "project", "status", project_id, "--json")
    assert json.loads(status.stdout)["outcome"] == "completed"
    listed = cli(broker, "project", "list", "--json")
    assert project_id in [p["project_id"] for p in json.loads(listed.stdout)]


def test_failed_build_ends_the_project_with_its_reason(broker, manager: ManagerProcess, tmp_path: Path) -> None:
    workers = FakeWorkers(broker)
    try:
        workers.fleet(2)
        project_id = _submit(broker, tmp_path, sla(make_git_repo(tmp_path / "repo")))
        build = workers.next_command("build")
        watch = cli_background(broker, "project", "watch", project_id)
        workers.report(build, "build.failed", reason="model_manager.py not found", log_tail="ls: repo")
        out, err = watch.communicate(timeout=60)
        print(err)
        # stop_project goes to every agent the project involved.
        stop = workers.next_command("stop_project")
        assert stop.agent_id == build.agent_id
    finally:
        workers.close()
    assert watch.returncode == 1
    assert "failed" in out and "model_manager.py not found" in out
    state = json.loads(cli(broker, "project", "status", project_id, "--json").stdout)
    assert state["failed_stage"] == "builder"
    assert state["reason"].startswith("build failed: model_manager.py not found")


def test_cancel_from_the_cli_ends_watch_with_exit_2(broker, manager: ManagerProcess, tmp_path: Path) -> None:
    workers = FakeWorkers(broker)
    try:
        workers.fleet(2)
        project_id = _submit(broker, tmp_path, sla(make_git_repo(tmp_path / "repo")))
        workers.next_command("build")
        watch = cli_background(broker, "project", "watch", project_id)
        done = cli(broker, "project", "cancel", project_id, "--reason", "changed my mind")
        assert done.returncode == 0, done.stderr
        watch.communicate(timeout=60)
        assert workers.next_command("stop_project").project_id == project_id
    finally:
        workers.close()
    assert watch.returncode == 2
    again = cli(broker, "project", "cancel", project_id)
    assert again.returncode == 1 and "already finished" in again.stderr


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"training_rounds": 0}, "training_configuration.training_rounds"),
        ({"min_fit_clients": 5}, "training_configuration"),
        ({"surprise": 1}, "training_configuration.surprise"),
    ],
)
def test_submit_rejects_bad_sla_with_field_errors(broker, tmp_path: Path, change: dict, field: str) -> None:
    body = sla("file:///nowhere", **change)
    file = tmp_path / "bad.json"
    file.write_text(json.dumps(body))
    done = cli(broker, "project", "submit", str(file), "--json")
    assert done.returncode == 1
    errors = json.loads(done.stdout)["errors"]
    assert any(e["field"] == field for e in errors), errors


def test_submit_without_manager_times_out_clearly(broker, tmp_path: Path) -> None:
    file = tmp_path / "ok.json"
    file.write_text(json.dumps(sla("file:///nowhere")))
    done = cli(broker, "project", "submit", str(file), "--timeout", "1")
    assert done.returncode == 75
    assert "flops manager" in done.stderr


def test_status_and_watch_of_an_unknown_project_say_so(broker, manager: ManagerProcess) -> None:
    status = cli(broker, "project", "status", "p-doesnotexist")
    assert status.returncode == 4 and "p-doesnotexist not found" in status.stderr
    watch = cli(broker, "project", "watch", "p-doesnotexist", timeout=30)
    assert watch.returncode == 4 and "not found" in watch.stderr
