"""Each strategy changes training as it should, with real aggregator and learner processes and real Flower
rounds on the same digits partitions: FedProx's proximal term (mu from the strategy parameters) keeps the
learners' local models closer to the global one than FedAvg; FedAdam's server-side step gives another model
than FedAvg's average."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from sklearn.datasets import load_digits

from flops.ports import free_port
from tests.runtime.test_training import DIGITS_REPO, TAG, Worker, _PartitionServer, _wait_no_processes

ROUNDS = 2


@pytest.fixture(scope="module")
def partitions() -> Iterator[list[str]]:
    """Two Flight servers with IID digits partitions (the same for every strategy)."""
    digits = load_digits()
    order = np.random.default_rng(7).permutation(len(digits.target))
    servers = []
    for part in np.array_split(order, 2):
        table = pa.table(
            {
                "image": pa.array(digits.data[part].tolist(), type=pa.list_(pa.float64())),
                "label": pa.array(digits.target[part], type=pa.int64()),
            }
        )
        server = _PartitionServer(table)
        threading.Thread(target=server.serve, daemon=True).start()
        servers.append(server)
    yield [f"grpc://127.0.0.1:{s.port}" for s in servers]
    for server in servers:
        server.shutdown()


@dataclass
class Trained:
    rounds: list[dict[str, Any]]
    result: dict[str, Any]
    model: list[np.ndarray]


def train(tmp: Path, locations: list[str], strategy: str, params: dict[str, float] | None = None) -> Trained:
    """Run ROUNDS real Flower rounds with two learners; the per-round reports, the result, the saved model."""
    marker = uuid.uuid4().hex
    address = f"127.0.0.1:{free_port()}"
    tmp.mkdir()
    aggregator = Worker(
        "flops.runtime.aggregator",
        [
            "--repo", str(DIGITS_REPO), "--rounds", str(ROUNDS), "--strategy", strategy,
            "--strategy-params", json.dumps(params or {}),
            "--min-available-clients", "2", "--min-fit-clients", "2", "--min-evaluate-clients", "2",
            "--address", address, "--model-out", str(tmp / "model"), "--client-wait-timeout", "120",
            "--work-dir", str(tmp / "aggregator"),
        ],
        marker,
        tmp / "aggregator.log",
    )  # fmt: skip
    learners = [
        Worker(
            "flops.runtime.learner",
            ["--repo", str(DIGITS_REPO), "--aggregator", address, "--data-server", location, "--data-tags", TAG],
            marker,
            tmp / f"learner{i}.log",
        )
        for i, location in enumerate(locations)
    ]
    try:
        kind, payload = aggregator.next_report(60)
        assert kind == "aggregator.started", payload
        rounds = []
        while (report := aggregator.next_report(120))[0] == "round.completed":
            rounds.append(report[1])
        kind, payload = report
        assert kind == "training.succeeded", payload
        with np.load(payload["model_ref"]) as archive:
            model = [archive[f"arr_{i}"] for i in range(len(archive.files))]
        return Trained(rounds, payload, model)
    finally:
        for worker in (aggregator, *learners):
            worker.stop()
        assert _wait_no_processes(marker) == []


@pytest.fixture(scope="module")
def fedavg(partitions: list[str], tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return train(tmp_path_factory.mktemp("fedavg") / "run", partitions, "fedavg")


@pytest.mark.timeout(300)
def test_fedprox_with_a_large_mu_keeps_local_models_close_to_the_global_one(
    fedavg: Trained, partitions: list[str], tmp_path: Path
) -> None:
    fedprox = train(tmp_path / "fedprox", partitions, "fedprox", {"proximal_mu": 10.0})
    avg_drift = [r["drift"] for r in fedavg.rounds]
    prox_drift = [r["drift"] for r in fedprox.rounds]
    print(f"\nlocal drift per round: fedavg {avg_drift}, fedprox(mu=10) {prox_drift}")
    assert len(prox_drift) == len(avg_drift) == ROUNDS
    # Every round, the proximal term holds the local models at a fraction of FedAvg's distance.
    assert all(p < 0.2 * a for p, a in zip(prox_drift, avg_drift, strict=True)), (prox_drift, avg_drift)


@pytest.mark.timeout(300)
def test_fedadam_takes_a_server_side_step_unlike_fedavg(fedavg: Trained, partitions: list[str], tmp_path: Path) -> None:
    fedadam = train(tmp_path / "fedadam", partitions, "fedadam", {"eta": 0.05})
    difference = max(float(np.max(np.abs(a - b))) for a, b in zip(fedadam.model, fedavg.model, strict=True))
    print(f"\nlargest parameter difference fedadam(eta=0.05) vs fedavg: {difference:.4f}")
    assert difference > 0.01
    assert fedadam.rounds[0]["loss"] != pytest.approx(fedavg.rounds[0]["loss"], rel=1e-3)
    # FedAdam's step is bounded by eta per round: with a small eta the model stays near the initial zeros.
    assert max(float(np.max(np.abs(a))) for a in fedadam.model) <= 0.05 * ROUNDS + 1e-6
