"""One canonical log line per handled event, bound with project_id, event_id and stage."""

from __future__ import annotations

from pathlib import Path

from structlog.testing import capture_logs

from tests.engine_support import EngineHarness


def test_each_handled_event_logs_one_line_with_its_context(tmp_path: Path) -> None:
    h = EngineHarness(tmp_path)
    h.fleet(2)
    project_id = h.submit()
    h.resolve(project_id)
    build = h.command(project_id, "build")
    with capture_logs() as logs:
        h.report(build, "build.started", event_id="e-started")
        h.report(build, "build.started", event_id="e-started")  # a redelivery
    handled = [entry for entry in logs if entry["event"] == "event handled"]
    assert len(handled) == 1
    assert handled[0]["project_id"] == project_id
    assert handled[0]["event_id"] == "e-started"
    assert handled[0]["stage"] == "builder"
    assert handled[0]["verdict"] == "accept"
    duplicates = [entry for entry in logs if entry["event"] == "duplicate ignored"]
    assert [d["event_id"] for d in duplicates] == ["e-started"]
