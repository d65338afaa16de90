"""Clustered hierarchical FL in the runtime, with real processes and real Flower at both levels: a root
aggregator, two cluster aggregators (each a SuperNode of the root and the SuperLink of its learners) and two
learners per cluster, for 2 cycles x 2 rounds."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from sklearn.datasets import load_digits

from flops.ports import free_port
from tests.runtime.test_training import DIGITS_REPO, TAG, Worker, _PartitionServer, _wait_no_processes

CYCLES, ROUNDS = 2, 2


@pytest.fixture
def four_partitions() -> Iterator[list[str]]:
    digits = load_digits()
    order = np.random.default_rng(11).permutation(len(digits.target))
    servers = []
    for part in np.array_split(order, 4):
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


def _aggregator(tmp: Path, name: str, marker: str, address: str, rounds: int, clients: int, *extra: str) -> Worker:
    return Worker(
        "flops.runtime.aggregator",
        [
            "--repo", str(DIGITS_REPO), "--rounds", str(rounds), "--strategy", "fedavg",
            "--min-available-clients", str(clients), "--min-fit-clients", str(clients),
            "--min-evaluate-clients", str(clients), "--address", address, "--model-out", str(tmp / name / "model"),
            "--client-wait-timeout", "120", "--work-dir", str(tmp / name), *extra,
        ],
        marker,
        tmp / f"{name}.log",
    )  # fmt: skip


@pytest.mark.timeout(400)
def test_two_clusters_two_cycles_of_two_rounds(four_partitions: list[str], tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    root_address = f"127.0.0.1:{free_port()}"
    cluster_addresses = {"a": f"127.0.0.1:{free_port()}", "b": f"127.0.0.1:{free_port()}"}
    root = _aggregator(tmp_path, "root", marker, root_address, CYCLES, 2)
    clusters = {
        name: _aggregator(
            tmp_path, f"cluster-{name}", marker, address, ROUNDS, 2, "--cluster", name, "--root-address", root_address
        )
        for name, address in cluster_addresses.items()
    }
    learners = [
        Worker(
            "flops.runtime.learner",
            [
                *["--repo", str(DIGITS_REPO), "--aggregator", cluster_addresses["ab"[i // 2]]],
                *["--data-server", location, "--data-tags", TAG],
            ],
            marker,
            tmp_path / f"learner{i}.log",
        )
        for i, location in enumerate(four_partitions)
    ]
    cluster_rounds: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}

    def collect(name: str) -> None:
        while True:
            try:
                kind, payload = clusters[name].next_report(300)
            except AssertionError:
                return
            if kind == "round.completed":
                cluster_rounds[name].append(payload)
            if kind == "training.failed":
                return

    readers = [threading.Thread(target=collect, args=(n,), daemon=True) for n in clusters]
    for reader in readers:
        reader.start()
    try:
        assert root.next_report(60)[0] == "aggregator.started"
        cycles = []
        while (report := root.next_report(300))[0] == "round.completed":
            cycles.append(report[1])
        kind, payload = report
        assert kind == "training.succeeded", (payload, root.log.read_text()[-3000:])
        assert [c["round"] for c in cycles] == [1, 2]
        # The root weights clusters by their examples: each cycle covers every learner's evaluation split.
        assert all(c["examples"] > 300 for c in cycles)
        assert payload["accuracy"] >= 0.85
        for name in clusters:
            got = [(r["cycle"], r["round"]) for r in cluster_rounds[name]]
            assert got == [(1, 1), (1, 2), (2, 1), (2, 2)], (name, got)
            assert all(r["cluster"] == name for r in cluster_rounds[name])
    finally:
        for worker in (root, *clusters.values(), *learners):
            worker.stop()
    assert _wait_no_processes(marker) == []
