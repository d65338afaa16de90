"""How long ``flops demo`` takes, per stage, cold (fresh builder cache) and warm (cached environment).

``python benchmarks/demo_time.py [--quick]``: runs the demo's base case twice in one process with a fresh
work directory — the first run builds the learners' environment (uv cache as the machine has it), the
second hits the artifact cache — and prints per-stage seconds and the total of each. Target: ≤ 60 s cold.
--quick runs only the warm case after one cold run it does not report.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import quiet_logs, record, table

from flops.demo import run_demo
from flops.settings import Settings

STAGES = ["preparation", "start", "builder", "learners", "aggregation", "post_training"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    quiet_logs("warning")
    work = Path(tempfile.mkdtemp(prefix="flops-demo-bench-"))
    console = Console(file=open("/dev/null", "w"))  # noqa: SIM115 - the demo's screen is not the point here
    rows, results = [], {}
    try:
        for label in ("cold", "warm"):
            started = time.monotonic()
            result = run_demo(Settings(data_dir=work / "data"), work / "demo", console)
            elapsed = time.monotonic() - started
            outcome = result.state.outcome.value if result.state.outcome else "?"
            right = sum(p == y for p, y in zip(result.predictions, result.labels, strict=True))
            results[label] = {
                "total_s": round(elapsed, 2),
                "stages_s": {k: round(v, 2) for k, v in result.stage_seconds.items()},
                "outcome": outcome,
                "federated_accuracy": result.state.progress.accuracy,
                "held_out_accuracy": round(right / max(1, len(result.labels)), 4),
            }
            rows.append(
                [
                    label,
                    *(round(result.stage_seconds.get(s, 0.0), 1) for s in STAGES),
                    round(elapsed, 1),
                    outcome,
                    results[label]["held_out_accuracy"],
                ]
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.quick:
        rows = rows[1:]
    table(rows, ["run", *STAGES, "total", "outcome", "held-out acc"])
    record("demo_time", args.quick, results)


if __name__ == "__main__":
    main()
