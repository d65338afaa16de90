"""Drives the aggregator's MLflow logging (:mod:`flops.runtime.tracking`) from stdin, for tests, in its own
process (MLflow keeps its tracking URI in a global): ``round N`` reports a round, ``end`` ends the training
(training.failed: no model to log). Report lines go to stdout, as an aggregator's go to its agent."""

from __future__ import annotations

import os
import sys
from argparse import Namespace

from flops.runtime.reports import ROUND_COMPLETED, TRAINING_FAILED, ReportWriter
from flops.runtime.tracking import wrap


def main() -> None:
    args = Namespace(
        strategy="fedavg", rounds=3, min_available_clients=1, min_fit_clients=1, min_evaluate_clients=1, repo="."
    )
    reports = wrap(ReportWriter(sys.stdout), os.environ, args)
    for line in sys.stdin:
        word, *rest = line.split()
        if word == "round":
            number = int(rest[0])
            reports.emit(ROUND_COMPLETED, round=number, loss=1.0 / number, accuracy=0.5 + number / 10, examples=90)
        elif word == "end":
            reports.emit(TRAINING_FAILED, reason="end of the test")
            return


if __name__ == "__main__":
    main()
