"""The aggregator's MLflow logging: experiment ``FLOps Project <id>``, one run per round (per cycle for the
root aggregator of hierarchical mode; cluster aggregators are never given a spec) with the strategy's
parameters, the round's loss, accuracy and example count and a sample of the aggregator host's system
metrics, and the best round's model logged with its flavor and registered (one version per project).

Only the aggregator logs (learners never: their data stays private). It wraps the aggregator's
:class:`~flops.runtime.reports.ReportWriter`: every report goes on to the agent at once; rounds are logged
by a worker thread, so a slow or stopped tracking server never holds the training up. What could not be
logged is kept and tried again with the next round; a ``tracking.logged`` report with a ``warning`` says
what is missing (once per outage and at the end), which the manager turns into a warning event. Nothing
here fails a project.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from flops.runtime.reports import ROUND_COMPLETED, TRACKING_LOGGED, TRAINING_FAILED, TRAINING_SUCCEEDED, ReportWriter

ENV = "FLOPS_TRACKING"
# MLflow's HTTP client retries for minutes by default; an aggregator must not wait that long on a down server.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
DRAIN_TIMEOUT_S = 30.0

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class TrackingSpec:
    url: str
    experiment: str
    project_id: str
    flavor: str
    registered_model: str
    unit: str = "round"  # "cycle" for the root aggregator of hierarchical mode

    @classmethod
    def from_env(cls, environ: dict[str, str] | os._Environ[str]) -> TrackingSpec | None:
        raw = environ.get(ENV)
        if not raw:
            return None
        data = json.loads(raw)
        return cls(**{k: str(v) for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class _State:
    experiment_id: str | None = None
    pending: list[dict[str, Any]] = field(default_factory=list)  # rounds not logged yet, oldest first
    run_ids: dict[int, str] = field(default_factory=dict)
    failing: bool = False


class TrackedReports(ReportWriter):
    """A ReportWriter that also logs to MLflow (see the module docstring); writes go through ``inner``."""

    def __init__(self, inner: ReportWriter, spec: TrackingSpec, params: dict[str, Any], repo: Path) -> None:
        super().__init__(inner._stream)
        self._inner = inner
        self.spec = spec
        self.params = {k: str(v) for k, v in params.items()}
        self.repo = repo
        self._state = _State()
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._flushing = threading.Lock()  # the worker and, at the end, the main thread
        self._log = log.bind(project_id=spec.project_id, tracking=spec.url)
        self._client: Any = None
        self._worker = threading.Thread(target=self._work, name="flops-tracking", daemon=True)
        self._worker.start()

    # --- ReportWriter ------------------------------------------------------------------------------

    def emit(self, kind: str, **payload: Any) -> None:
        if kind in (TRAINING_SUCCEEDED, TRAINING_FAILED):
            self._drain()
            if kind == TRAINING_SUCCEEDED:
                self._log_best(payload)
            self._say_what_is_missing()
        self._inner.emit(kind, **payload)
        if kind == ROUND_COMPLETED:
            self._idle.clear()
            self._queue.put({**payload, "ts": time.time(), "system": system_metrics()})

    # --- rounds (worker thread) ----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._state.pending.append(item)
            self._flush()
            if self._queue.empty():
                self._idle.set()

    def _drain(self) -> None:
        """Wait (bounded) for the worker, then try once more what is still pending."""
        self._idle.wait(DRAIN_TIMEOUT_S)
        self._flush()

    def _flush(self) -> None:
        with self._flushing:
            self._flush_locked()

    def _flush_locked(self) -> None:
        while self._state.pending:
            item = self._state.pending[0]
            try:
                run_id = self._log_round(item)
            except Exception as exc:
                if not self._state.failing:
                    self._state.failing = True
                    self._warn(
                        f"tracking server {self.spec.url} unreachable ({_short(exc)}); "
                        f"round {item['round']} and later are logged when it is back"
                    )
                return
            self._state.pending.pop(0)
            self._state.run_ids[int(item["round"])] = run_id
            if self._state.failing:
                self._state.failing = False
                self._log.info("tracking server back", round=item["round"])
            self._report(round=int(item["round"]), run_id=run_id)

    def _log_round(self, item: dict[str, Any]) -> str:
        from mlflow.entities import Metric, Param, RunTag

        client = self._mlflow()
        experiment_id = self._experiment_id()
        rnd = int(item["round"])
        if rnd in self._state.run_ids:
            return self._state.run_ids[rnd]
        unit = self.spec.unit
        tags = {"flops.project_id": self.spec.project_id, "flops.round": str(rnd), "flops.kind": unit}
        if unit != "round":
            tags[f"flops.{unit}"] = str(rnd)
        run = client.create_run(experiment_id, run_name=f"{unit}-{rnd}", tags=tags)
        run_id = run.info.run_id
        stamp = int(float(item["ts"]) * 1000)
        values = {k: item.get(k) for k in ("loss", "accuracy", "examples", "duration_s")}
        values.update(item.get("system") or {})
        metrics = [Metric(k, float(v), stamp, rnd) for k, v in values.items() if isinstance(v, int | float)]
        params = [Param(k, v) for k, v in self.params.items()]
        client.log_batch(run_id, metrics=metrics, params=params, tags=[RunTag("mlflow.source.name", "flops")])
        client.set_terminated(run_id)
        return str(run_id)

    # --- the best model (main thread, before training.succeeded goes out) ------------------------------

    def _log_best(self, payload: dict[str, Any]) -> None:
        best = int(payload["best_round"])
        run_id = self._state.run_ids.get(best)
        if run_id is None:
            self._warn(f"best model not logged: round {best} has no MLflow run")
            return
        try:
            model = load_model(self.repo, Path(str(payload["model_ref"])))
            model_uri, version = self._log_model(run_id, model)
        except Exception as exc:
            self._warn(f"best model (round {best}) not logged: {_short(exc)}")
            return
        self._report(
            run_id=run_id, model_uri=model_uri, registered_model=self.spec.registered_model, model_version=version
        )

    def _log_model(self, run_id: str, model: Any) -> tuple[str, str | None]:
        import importlib

        import mlflow

        flavor = importlib.import_module(f"mlflow.{self.spec.flavor}")
        client = self._mlflow()
        client.set_tag(run_id, "flops.best", "true")
        mlflow.start_run(run_id=run_id)
        try:
            info = flavor.log_model(model, name="model", registered_model_name=self.spec.registered_model)
        finally:
            mlflow.end_run()  # FINISHED even when logging failed: the round did finish (the warning says the rest)
        version = getattr(info, "registered_model_version", None)
        return str(info.model_uri), str(version) if version is not None else None

    # --- helpers -------------------------------------------------------------------------------------

    def _mlflow(self) -> Any:
        if self._client is None:
            import mlflow
            from mlflow.tracking import MlflowClient

            mlflow.set_tracking_uri(self.spec.url)
            self._client = MlflowClient(tracking_uri=self.spec.url, registry_uri=self.spec.url)
        return self._client

    def _experiment_id(self) -> str:
        if self._state.experiment_id is None:
            client = self._mlflow()
            found = client.get_experiment_by_name(self.spec.experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(self.spec.experiment)
            self._state.experiment_id = str(experiment_id)
            self._report(experiment_id=self._state.experiment_id)
        return self._state.experiment_id

    def _say_what_is_missing(self) -> None:
        missing = [int(item["round"]) for item in self._state.pending]
        if missing:
            self._warn(f"rounds {', '.join(map(str, missing))} were not logged to MLflow")

    def _warn(self, message: str) -> None:
        self._log.warning("tracking", warning=message)
        self._report(warning=message)

    def _report(self, **fields: Any) -> None:
        self._inner.emit(TRACKING_LOGGED, url=self.spec.url, **{k: v for k, v in fields.items() if v is not None})

    def close(self) -> None:
        self._queue.put(None)


def system_metrics() -> dict[str, float]:
    """A sample of the aggregator host, under MLflow's own system-metric names (psutil when installed)."""
    try:
        import psutil
    except ImportError:
        return {}
    memory = psutil.virtual_memory()
    return {
        "system/cpu_utilization_percentage": float(psutil.cpu_percent(interval=None)),
        "system/system_memory_usage_megabytes": memory.used / 2**20,
        "system/system_memory_usage_percentage": float(memory.percent),
    }


def load_model(repo: Path, model_ref: Path) -> Any:
    """The repo's model with the best round's parameters (``model.npz``), as its flavor logs it."""
    import numpy as np

    from flops.runtime.repo import new_model_manager

    path = model_ref if model_ref.suffix == ".npz" else model_ref / "model.npz"
    with np.load(path) as saved:
        arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    manager = new_model_manager(repo)
    manager.set_model_parameters(arrays)
    return manager.get_model()


def wrap(reports: ReportWriter, environ: dict[str, str] | os._Environ[str], args: Any) -> ReportWriter:
    """``reports``, logging to MLflow as well when the agent passed a tracking spec (``FLOPS_TRACKING``)."""
    spec = TrackingSpec.from_env(environ)
    if spec is None:
        return reports
    for key, value in CLIENT_ENV.items():
        os.environ.setdefault(key, value)
    params = {
        "strategy": args.strategy,
        "rounds": args.rounds,
        "min_available_clients": args.min_available_clients,
        "min_fit_clients": args.min_fit_clients,
        "min_evaluate_clients": args.min_evaluate_clients,
        "flavor": spec.flavor,
    }
    return TrackedReports(reports, spec, params, Path(args.repo))


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."
