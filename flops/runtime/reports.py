"""Report lines a runtime process hands to its agent: one JSON object per line.

Each line is ``{"kind": ..., "payload": {...}}``. The agent reads them from the file descriptor
it passed as ``--report-fd`` (stdout when absent) and turns them into MQTT worker reports.

Kinds and payloads:

- ``learner.ready`` {node_id, aggregator}
- ``learner.failed`` {reason}
- ``aggregator.started`` {address}
- ``round.completed`` {round, loss, accuracy, examples, duration_s}
- ``training.succeeded`` {best_round, loss, accuracy, model_ref}
- ``training.failed`` {reason}
- ``model.built`` {image_ref} (``flops.builder.model_image``)
- ``model.served`` {url}
- ``model.failed`` {reason, log_tail}
- ``tracking.logged`` {url, experiment_id, round, run_id, model_uri, registered_model, model_version,
  warning} (``flops.runtime.tracking``)
- ``build.started`` {}, ``build.succeeded`` {artifact, cached, warnings, duration_s},
  ``build.failed`` {reason, log_tail} (``flops.builder.worker``)
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import IO, Any, Final

LEARNER_READY: Final = "learner.ready"
LEARNER_FAILED: Final = "learner.failed"
AGGREGATOR_STARTED: Final = "aggregator.started"
ROUND_COMPLETED: Final = "round.completed"
TRAINING_SUCCEEDED: Final = "training.succeeded"
TRAINING_FAILED: Final = "training.failed"
MODEL_BUILT: Final = "model.built"
MODEL_SERVED: Final = "model.served"
MODEL_FAILED: Final = "model.failed"
BUILD_STARTED: Final = "build.started"
BUILD_SUCCEEDED: Final = "build.succeeded"
BUILD_FAILED: Final = "build.failed"
TRACKING_LOGGED: Final = "tracking.logged"

# What a child's failure is reported as, by the command that started it (an agent, or flops.oakestra.shim).
FAILURE_KIND: Final = {
    "run_learner": LEARNER_FAILED,
    "run_aggregator": TRAINING_FAILED,
    "serve_model": MODEL_FAILED,
    "build": BUILD_FAILED,
    "build_model_image": MODEL_FAILED,
}
# Kinds after which a child has reported its command's outcome.
TERMINAL: Final = frozenset(
    {
        MODEL_BUILT,
        LEARNER_FAILED,
        TRAINING_SUCCEEDED,
        TRAINING_FAILED,
        MODEL_SERVED,
        MODEL_FAILED,
        BUILD_SUCCEEDED,
        BUILD_FAILED,
    }
)

REPORT_KINDS: Final = frozenset(
    {
        LEARNER_READY,
        LEARNER_FAILED,
        AGGREGATOR_STARTED,
        ROUND_COMPLETED,
        TRAINING_SUCCEEDED,
        TRAINING_FAILED,
        MODEL_BUILT,
        MODEL_SERVED,
        MODEL_FAILED,
        BUILD_STARTED,
        BUILD_SUCCEEDED,
        BUILD_FAILED,
        TRACKING_LOGGED,
    }
)


def encode_report(kind: str, payload: dict[str, Any]) -> str:
    """Return the report line (without newline) for ``kind`` and ``payload``."""
    if kind not in REPORT_KINDS:
        raise ValueError(f"unknown report kind {kind!r}")
    return json.dumps({"kind": kind, "payload": payload}, separators=(",", ":"), sort_keys=True)


def decode_report(line: str) -> tuple[str, dict[str, Any]]:
    """Parse one report line into ``(kind, payload)``; raises ``ValueError`` on anything else."""
    obj = json.loads(line)
    if not isinstance(obj, dict) or obj.get("kind") not in REPORT_KINDS or not isinstance(obj.get("payload"), dict):
        raise ValueError(f"not a report line: {line!r}")
    return obj["kind"], obj["payload"]


class ReportWriter:
    """Writes report lines to one stream, flushing each line; safe to share between threads."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    @classmethod
    def open(cls, report_fd: int | None) -> ReportWriter:
        """Write to file descriptor ``report_fd``, or to stdout when it is ``None``."""
        if report_fd is None:
            return cls(sys.stdout)
        return cls(os.fdopen(report_fd, "w", buffering=1, encoding="utf-8", closefd=False))

    def emit(self, kind: str, **payload: Any) -> None:
        """Write one report line."""
        line = encode_report(kind, payload)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()
