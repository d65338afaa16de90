"""The Flower ServerApp of an aggregator: runs ``flops.runtime.training`` with the run config.

The SuperLink starts it in its own process, so it cannot write to the aggregator's report fd;
it appends report lines to the run config's ``events-file`` instead, which the aggregator
process follows and forwards. A cluster aggregator's run (``role = "cluster"``) serves the root's requests
(``flops.runtime.cluster_training``) instead of running the whole training. Any failure becomes a
``training.failed`` line and re-raises, so Flower marks the run failed too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import structlog
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flops.runtime.bridge import Bridge
from flops.runtime.cluster_training import run_cluster
from flops.runtime.polling_grid import PollingGrid
from flops.runtime.repo import new_model_manager, traceback_tail
from flops.runtime.reports import TRAINING_FAILED, ReportWriter
from flops.runtime.training import TrainingError, TrainingSettings, run_training
from flops.supervisor import exit_with_owner

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls once per run."""
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    exit_with_owner()
    cfg = dict(context.run_config)
    events_path = Path(str(cfg["events-file"]))
    with events_path.open("a", encoding="utf-8", buffering=1) as events:
        reports = ReportWriter(events)
        try:
            settings = TrainingSettings.from_run_config(cfg)
            initial = list(new_model_manager(settings.repo).get_model_parameters())
            fast_grid = PollingGrid(grid, interval=settings.poll_interval)
            if cfg.get("role") == "cluster":
                bridge = Bridge(Path(str(cfg["bridge"])), poll=settings.poll_interval)
                run_cluster(fast_grid, settings, reports, str(cfg["cluster"]), bridge)
            else:
                run_training(fast_grid, settings, reports, initial)
        except TrainingError as exc:
            reports.emit(TRAINING_FAILED, reason=str(exc))
            raise
        except Exception as exc:
            reports.emit(TRAINING_FAILED, reason=f"{type(exc).__name__}: {exc}\n{traceback_tail(exc)}")
            raise
