"""Classic vs clustered hierarchical FL for the same total learner rounds: wall time, accuracy, root overhead.

``python benchmarks/hierarchical.py [--quick] [--shape CxR ...]``: starts the hierarchical demo's system
(embedded broker, manager, a root agent and four learner agents in clusters east and west, IID digits), then
per shape C cycles x R rounds runs one hierarchical project (2 learners per cluster) and one classic project
(all 4 learners, C*R rounds), no post-training steps. Reported per project: aggregation-stage seconds, seconds
per learner round, and the held-out accuracy of the kept model (digits test split, never pushed to an
agent); for hierarchical runs also the root level's overhead per cycle: the root's cycle time minus the
slowest cluster's rounds in that cycle (the hand-over down and up, the cluster's evaluation of the global
model, the root's aggregation). The first project pays the environment build (not in the aggregation time).
--quick: only 2x3 (the original small SLA).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import quiet_logs, record, table

from flops.client import Client
from flops.data.mock import load_dataset
from flops.demo import example_repo, running_system
from flops.demo_hierarchical import HIERARCHICAL_SLA, ClusteredFleet
from flops.messages import ProjectEvent, ProjectState
from flops.runtime.repo import new_model_manager
from flops.settings import Settings

EXAMPLE_REPO = Path(__file__).resolve().parents[1] / "examples" / "ml_repos" / "digits_sklearn"


def held_out_accuracy(model_npz: Path) -> float:
    test = load_dataset("digits", split="test")
    x = np.asarray(test.column("image").to_pylist(), dtype=np.float64).reshape(test.num_rows, -1) / 16.0
    y = np.asarray(test.column("label").to_pylist())
    saved = list(sys.path)
    try:
        manager = new_model_manager(EXAMPLE_REPO)
        with np.load(model_npz) as archive:
            manager.set_model_parameters([archive[f"arr_{i}"] for i in range(len(archive.files))])
        return float((manager.get_model().predict(x) == y).mean())
    finally:
        sys.path[:] = saved
        for name in ("model_manager", "data_manager"):
            sys.modules.pop(name, None)


def run_project(client: Client, body: dict[str, Any], timeout: float) -> tuple[str, ProjectState, list[ProjectEvent]]:
    reply = client.submit(body)
    assert reply.project_id, reply.errors
    events: list[ProjectEvent] = []
    state: ProjectState | None = None
    for item in client.follow(reply.project_id, timeout=timeout):
        if isinstance(item, ProjectEvent):
            events.append(item)
        else:
            state = item
    assert state is not None and state.outcome is not None, state
    assert state.outcome.value == "completed", state.reason
    return reply.project_id, state, events


def root_overhead(events: list[ProjectEvent]) -> list[float]:
    """Per cycle: the root's cycle time minus the slowest cluster's summed round times in that cycle."""
    out = []
    for cycle_event in (e for e in events if e.kind == "round.completed" and e.data.get("level") == "root"):
        cycle = cycle_event.data["cycle"]
        per_cluster: dict[str, float] = {}
        for e in events:
            if e.data.get("level") == "cluster" and e.data.get("cycle") == cycle:
                per_cluster[e.data["cluster"]] = per_cluster.get(e.data["cluster"], 0.0) + e.data["duration_s"]
        out.append(cycle_event.data["duration_s"] - max(per_cluster.values()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shape", action="append", default=None, help="CxR, e.g. 2x3 (repeatable)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    shapes = [tuple(int(n) for n in s.split("x")) for s in (args.shape or (["2x3"] if args.quick else ["2x3", "4x3"]))]
    quiet_logs("warning")
    work = Path(tempfile.mkdtemp(prefix="flops-hier-bench-"))
    rows: list[list[Any]] = []
    results: dict[str, Any] = {}
    try:
        settings = Settings(data_dir=work / "data")
        repo_url = example_repo(work)
        with running_system(settings, work, 5, fleet_class=ClusteredFleet) as (address, fleet):
            assert isinstance(fleet, ClusteredFleet)
            fleet.push_digits(fleet.wait_online(), fleet.learners)
            with Client(address) as client:
                for cycles, rounds in shapes:
                    for mode in ("hierarchical", "classic"):
                        body = json.loads(HIERARCHICAL_SLA.read_text())
                        body["ml_repo_url"] = repo_url
                        body["post_training_steps"] = []
                        tc = body["training_configuration"]
                        if mode == "hierarchical":
                            tc.update(training_cycles=cycles, training_rounds=rounds)
                        else:
                            tc.update(mode="classic", training_cycles=1, training_rounds=cycles * rounds)
                            tc.update(min_available_clients=4, min_fit_clients=4, min_evaluate_clients=4)
                        project_id, state, events = run_project(client, body, args.timeout)
                        ts = state.stage_timestamps
                        aggregation = ts["post_training_at"] - ts["aggregation_at"]
                        # Only the root aggregator keeps a model (cluster aggregators hand theirs up).
                        (model,) = (work / "agents" / "root" / "work" / project_id).glob("*/model/model.npz")
                        accuracy = held_out_accuracy(model)
                        overhead = root_overhead(events) if mode == "hierarchical" else []
                        key = f"{cycles}x{rounds}/{mode}"
                        results[key] = {
                            "aggregation_s": round(aggregation, 2),
                            "s_per_learner_round": round(aggregation / (cycles * rounds), 2),
                            "held_out_accuracy": round(accuracy, 4),
                            "root_overhead_per_cycle_s": [round(o, 2) for o in overhead],
                        }
                        rows.append(
                            [
                                f"{cycles}x{rounds}",
                                mode,
                                round(aggregation, 1),
                                round(aggregation / (cycles * rounds), 2),
                                round(accuracy, 4),
                                round(statistics.median(overhead), 2) if overhead else "",
                            ]
                        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table(rows, ["shape", "mode", "aggregation s", "s / learner round", "held-out acc", "root overhead / cycle s"])
    record("hierarchical", args.quick, results)


if __name__ == "__main__":
    main()
