"""Server side of a cluster aggregator (clustered hierarchical FL): the cluster's rounds, once per cycle.

Runs inside the cluster's Flower ServerApp. It waits for the cluster's learners, then answers the root's
requests as they arrive over the :mod:`flops.runtime.bridge`: *train* runs ``training_rounds`` rounds of the
project's strategy with the cluster's learners, starting from the root's global model, and hands back the
cluster model and its training examples (what the root weights clusters by); *evaluate* asks every learner
to evaluate the root's global model and hands back the example-weighted loss and accuracy. Every cluster
round is reported as round.completed with the cluster's name and the cycle. It runs until its aggregator
is stopped; a round that cannot finish reports training.failed, naming the cluster.
"""

from __future__ import annotations

import numpy as np
import structlog
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flops.runtime.bridge import TRAIN, Bridge, Request
from flops.runtime.reports import ReportWriter
from flops.runtime.training import RoundTracker, TrainingError, TrainingSettings, build_strategy, wait_for_learners


def train_cycle(
    grid: Grid, settings: TrainingSettings, reports: ReportWriter, cluster: str, request: Request
) -> tuple[list[np.ndarray], dict[str, float]]:
    """The cluster's rounds of one cycle from the root's arrays: the cluster model and its metrics."""
    tracker = RoundTracker(reports, cluster=cluster, cycle=request.cycle)
    strategy = build_strategy(settings, tracker)
    tracker.begin()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(request.arrays),
        num_rounds=settings.rounds,
        timeout=settings.round_timeout,
        train_config=ConfigRecord({"strategy": settings.strategy, "cycle": request.cycle}),
    )
    if len(tracker.rounds) != settings.rounds:
        raise TrainingError(f"cycle {request.cycle}: only {len(tracker.rounds)} of {settings.rounds} rounds completed")
    last = tracker.rounds[-1]
    metrics = {"num-examples": tracker.train_examples, "loss": last.loss, "accuracy": last.accuracy}
    return result.arrays.to_numpy_ndarrays(), metrics


def evaluate_global(grid: Grid, settings: TrainingSettings, request: Request) -> dict[str, float]:
    """Every learner of the cluster evaluates the root's global model: example-weighted loss and accuracy."""
    strategy = FedAvg(
        fraction_train=0.0,
        fraction_evaluate=1.0,
        min_evaluate_nodes=settings.min_evaluate_clients,
        min_available_nodes=settings.min_available_clients,
    )
    messages = strategy.configure_evaluate(request.cycle, ArrayRecord(request.arrays), ConfigRecord(), grid)
    replies = [m for m in grid.send_and_receive(messages, timeout=settings.round_timeout) if not m.has_error()]
    if not replies:
        raise TrainingError(f"cycle {request.cycle}: no learner evaluated the global model")
    metrics = [m.content.metric_records["metrics"] for m in replies]
    examples = sum(int(m["num-examples"]) for m in metrics)
    weight = max(examples, 1)
    return {
        "loss": sum(float(m["loss"]) * int(m["num-examples"]) for m in metrics) / weight,
        "accuracy": sum(float(m["accuracy"]) * int(m["num-examples"]) for m in metrics) / weight,
        "num-examples": examples,
    }


def run_cluster(grid: Grid, settings: TrainingSettings, reports: ReportWriter, cluster: str, bridge: Bridge) -> None:
    """Serve the root's requests until stopped; raises TrainingError (after answering the root) on failure."""
    log = structlog.get_logger(__name__).bind(cluster=cluster, strategy=settings.strategy, rounds=settings.rounds)
    wait_for_learners(
        grid,
        minimum=settings.min_available_clients,
        timeout=settings.client_wait_timeout,
        interval=settings.poll_interval,
    )
    log.info("cluster.learners_connected")
    while True:
        request = bridge.next_request(timeout=settings.round_timeout)
        log.info("cluster.request", kind=request.kind, cycle=request.cycle)
        try:
            if request.kind == TRAIN:
                arrays, metrics = train_cycle(grid, settings, reports, cluster, request)
                bridge.answer(request, arrays=arrays, metrics=metrics)
            else:
                bridge.answer(request, metrics=evaluate_global(grid, settings, request))
        except TrainingError as exc:
            bridge.answer(request, error=f"cluster {cluster}: {exc}")
            raise TrainingError(f"cluster {cluster}: {exc}") from exc
