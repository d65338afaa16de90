"""Server-side training loop: wait for learners, run the strategy, track rounds, keep the best model.

Runs inside the Flower ServerApp. Every observable step becomes a report line on ``reports``
(round.completed per round, then training.succeeded or training.failed). The best round is the
one with the lowest example-weighted evaluate loss (ties: higher accuracy); its aggregated
parameters are saved as ``model.npz`` (``np.savez`` of the parameter list, ``arr_0..arr_k``) next
to ``metrics.json``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from flops.runtime.reports import ROUND_COMPLETED, TRAINING_SUCCEEDED, ReportWriter

STRATEGIES = ("fedavg", "fedprox", "fedadam")
DEFAULT_PROXIMAL_MU = 0.1


class TrainingError(RuntimeError):
    """Training cannot go on; the message is the reason reported in training.failed."""


@dataclass(frozen=True)
class TrainingSettings:
    """What the ServerApp needs to run one project's training (from the run config)."""

    repo: Path
    rounds: int
    strategy: str
    min_available_clients: int
    min_fit_clients: int
    min_evaluate_clients: int
    client_wait_timeout: float
    round_timeout: float
    model_out: Path
    poll_interval: float
    # The strategy's parameters (``training_configuration.strategy_params``): FedProx's proximal_mu,
    # FedAdam's eta, eta_l, beta_1, beta_2, tau.
    strategy_params: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_run_config(cls, cfg: dict[str, Any]) -> TrainingSettings:
        strategy = str(cfg["strategy"]).lower()
        if strategy not in STRATEGIES:
            raise TrainingError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
        return cls(
            repo=Path(str(cfg["repo"])),
            rounds=int(cfg["rounds"]),
            strategy=strategy,
            min_available_clients=int(cfg["min-available-clients"]),
            min_fit_clients=int(cfg["min-fit-clients"]),
            min_evaluate_clients=int(cfg["min-evaluate-clients"]),
            client_wait_timeout=float(cfg["client-wait-timeout"]),
            round_timeout=float(cfg["round-timeout"]),
            model_out=Path(str(cfg["model-out"])),
            poll_interval=float(cfg["poll-interval"]),
            strategy_params=parse_strategy_params(strategy, str(cfg.get("strategy-params") or "{}")),
        )


STRATEGY_PARAMS = {"fedavg": (), "fedprox": ("proximal_mu",), "fedadam": ("eta", "eta_l", "beta_1", "beta_2", "tau")}


def parse_strategy_params(strategy: str, text: str) -> dict[str, float]:
    """The strategy's parameters from their JSON object; a parameter the strategy does not take is an error."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise TrainingError(f"strategy parameters are not a JSON object: {exc}") from exc
    if not isinstance(raw, dict):
        raise TrainingError("strategy parameters are not a JSON object")
    foreign = sorted(set(raw) - set(STRATEGY_PARAMS[strategy]))
    if foreign:
        raise TrainingError(f"strategy {strategy} takes no parameter {', '.join(foreign)}")
    return {str(k): float(v) for k, v in raw.items()}


@dataclass
class RoundResult:
    """One finished round: the evaluated global arrays and their weighted metrics."""

    round: int
    loss: float
    accuracy: float
    examples: int
    duration_s: float
    arrays: list[np.ndarray] = field(repr=False)


class RoundTracker:
    """Collects per-round results from the strategy hooks, reports them and remembers the best."""

    def __init__(self, reports: ReportWriter, **extra: Any) -> None:
        self._reports = reports
        # Fields every round.completed carries besides the round's own (a cluster's name and cycle).
        self._extra = extra
        self.train_examples = 0
        self._round_started = time.monotonic()
        self._arrays: list[np.ndarray] | None = None
        self._sent: list[np.ndarray] | None = None
        self._drift: float | None = None
        self.rounds: list[RoundResult] = []
        self._log = structlog.get_logger(__name__)

    def begin(self) -> None:
        self._round_started = time.monotonic()

    def train_sent(self, arrays: ArrayRecord) -> None:
        """The global arrays this round's training started from (what local drift is measured against)."""
        self._sent = arrays.to_numpy_ndarrays()

    def train_done(self, server_round: int, replies: list[Message], arrays: ArrayRecord | None) -> None:
        if arrays is None:
            raise TrainingError(f"round {server_round}: no usable training reply ({_errors(replies)})")
        self._arrays = arrays.to_numpy_ndarrays()
        ok = [m for m in replies if not m.has_error()]
        self.train_examples = sum(int(m.content.metric_records["metrics"]["num-examples"]) for m in ok)
        self._drift = local_drift(self._sent, [m for m in replies if not m.has_error()])

    def evaluate_done(self, server_round: int, replies: list[Message]) -> None:
        ok = [m for m in replies if not m.has_error()]
        if not ok or self._arrays is None:
            raise TrainingError(f"round {server_round}: no usable evaluation reply ({_errors(replies)})")
        metrics = [m.content.metric_records["metrics"] for m in ok]
        examples = sum(int(m["num-examples"]) for m in metrics)
        weight = max(examples, 1)
        loss = sum(float(m["loss"]) * int(m["num-examples"]) for m in metrics) / weight
        accuracy = sum(float(m["accuracy"]) * int(m["num-examples"]) for m in metrics) / weight
        now = time.monotonic()
        result = RoundResult(server_round, loss, accuracy, examples, round(now - self._round_started, 3), self._arrays)
        self._round_started = now
        self.rounds.append(result)
        self._log.info(
            "round.completed", round=server_round, loss=loss, accuracy=accuracy, examples=examples, drift=self._drift
        )
        self._reports.emit(
            ROUND_COMPLETED,
            round=result.round,
            loss=result.loss,
            accuracy=result.accuracy,
            examples=result.examples,
            duration_s=result.duration_s,
            **({} if self._drift is None else {"drift": self._drift}),
            **self._extra,
        )

    def best(self) -> RoundResult:
        if not self.rounds:
            raise TrainingError("no round completed")
        return min(self.rounds, key=lambda r: (r.loss, -r.accuracy))


def local_drift(sent: list[np.ndarray] | None, replies: list[Message]) -> float | None:
    """Mean L2 distance of the learners' trained models from the global model they started from: how far
    local training pulls away (FedProx's proximal term exists to keep it small)."""
    if sent is None or not replies:
        return None
    distances = []
    for reply in replies:
        local = reply.content.array_records["arrays"].to_numpy_ndarrays()
        squares = sum(
            float(np.sum((np.asarray(a, dtype=np.float64) - b) ** 2)) for a, b in zip(local, sent, strict=True)
        )
        distances.append(squares**0.5)
    return float(np.mean(distances))


def _errors(replies: Iterable[Message]) -> str:
    """The learners' error reasons, each distinct one once: learners running the same repo fail alike, and
    a traceback repeated per learner buries the reason."""
    reasons = Counter(m.error.reason for m in replies if m.has_error())
    if not reasons:
        return "no replies"
    return "; ".join(f"from {n} learners: {r}" if n > 1 else r for r, n in reasons.items())


class _Tracked:
    """Mixin for Flower message strategies: hands each round's replies to a RoundTracker."""

    tracker: RoundTracker

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Any:
        self.tracker.train_sent(arrays)
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        self.tracker.train_done(server_round, replies, arrays)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        metrics = super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]
        self.tracker.evaluate_done(server_round, replies)
        return metrics


class TrackedFedAvg(_Tracked, FedAvg):
    """FedAvg reporting every round."""


class TrackedFedProx(_Tracked, FedProx):
    """FedProx reporting every round (``proximal-mu`` goes to the learners in each round's train config, and
    reaches the repo's ``fit_model(config)`` as ``config["proximal_mu"]``)."""


class TrackedFedAdam(_Tracked, FedAdam):
    """FedAdam (server-side Adam on the averaged update) reporting every round."""


def build_strategy(settings: TrainingSettings, tracker: RoundTracker) -> Strategy:
    """The chosen strategy, sampling every connected learner, with the configured minimums."""
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": settings.min_fit_clients,
        "min_evaluate_nodes": settings.min_evaluate_clients,
        "min_available_nodes": settings.min_available_clients,
    }
    strategy: _Tracked
    params = settings.strategy_params
    if settings.strategy == "fedprox":
        strategy = TrackedFedProx(proximal_mu=params.get("proximal_mu", DEFAULT_PROXIMAL_MU), **common)
    elif settings.strategy == "fedadam":
        strategy = TrackedFedAdam(**params, **common)
    else:
        strategy = TrackedFedAvg(**common)
    strategy.tracker = tracker
    return strategy  # type: ignore[return-value]


def wait_for_learners(grid: Grid, *, minimum: int, timeout: float, interval: float) -> int:
    """Block until ``minimum`` learners are connected; raise TrainingError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < minimum:
        if time.monotonic() >= deadline:
            raise TrainingError(f"only {connected} of {minimum} learners connected within {timeout:g} s")
        time.sleep(interval)
    return connected


def save_model(rounds: list[RoundResult], best: RoundResult, out_dir: Path, strategy: str) -> Path:
    """Write the best round's parameters (``model.npz``) and all rounds' metrics (``metrics.json``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.npz"
    np.savez(model_path, *best.arrays)
    metrics = {
        "best_round": best.round,
        "best_by": "evaluate_loss",
        "loss": best.loss,
        "accuracy": best.accuracy,
        "examples": best.examples,
        "strategy": strategy,
        "rounds": [{"round": r.round, "loss": r.loss, "accuracy": r.accuracy, "examples": r.examples} for r in rounds],
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return model_path


def run_training(grid: Grid, settings: TrainingSettings, reports: ReportWriter, initial: list[np.ndarray]) -> None:
    """Run all rounds and report training.succeeded; raises TrainingError when training cannot finish."""
    log = structlog.get_logger(__name__).bind(strategy=settings.strategy, rounds=settings.rounds)
    wait_for_learners(
        grid,
        minimum=settings.min_available_clients,
        timeout=settings.client_wait_timeout,
        interval=settings.poll_interval,
    )
    tracker = RoundTracker(reports)
    strategy = build_strategy(settings, tracker)
    tracker.begin()
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([np.asarray(a) for a in initial]),
        num_rounds=settings.rounds,
        timeout=settings.round_timeout,
        train_config=ConfigRecord({"strategy": settings.strategy}),
    )
    if len(tracker.rounds) != settings.rounds:
        raise TrainingError(f"only {len(tracker.rounds)} of {settings.rounds} rounds completed")
    best = tracker.best()
    model_path = save_model(tracker.rounds, best, settings.model_out, settings.strategy)
    log.info("training.succeeded", best_round=best.round, loss=best.loss, accuracy=best.accuracy)
    reports.emit(
        TRAINING_SUCCEEDED,
        best_round=best.round,
        loss=best.loss,
        accuracy=best.accuracy,
        model_ref=str(model_path),
    )
