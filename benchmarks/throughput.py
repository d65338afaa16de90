"""Sustained manager throughput: 1,000 concurrent projects driven through every stage by simulated workers.

The manager runs in this process (flops.manager.Manager, SQLiteStore with synchronous=FULL, production log
pipeline rendered to /dev/null). A child process plays the workers over MQTT: it submits every request at
once, answers each command immediately (no per-message publish_wait; at most ``--inflight`` unacknowledged
QoS 1 publishes) and watches the retained states until every project is finished.

Events = requests + worker reports (+ agent statuses) handled by the manager, counted in its worker thread.
Sustained rate = events / (last event - first event); the per-second series is printed too.

    python benchmarks/throughput.py [--quick] [--projects N] [--rounds R] [--sync FULL|NORMAL]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from collections import Counter
from pathlib import Path

import _common as c

from flops import topics
from flops.manager import Manager
from flops.settings import Settings
from flops.store_sqlite import SQLiteStore


class CountingManager(Manager):
    """The real manager, counting what its worker handles (one attribute bump per message)."""

    def __init__(self, *a, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*a, **kw)
        self.counts: Counter[str] = Counter()
        self.times: list[float] = []
        self.verdicts: Counter[str] = Counter()

    profile: str | None = None

    def _run(self) -> None:
        if not self.profile:
            return super()._run()
        import cProfile

        prof = cProfile.Profile()
        try:
            prof.runcall(super()._run)
        finally:
            prof.dump_stats(self.profile)

    def _handle(self, item):  # type: ignore[no-untyped-def]
        result = super()._handle(item)
        kind = topics.parse(item.topic).kind if hasattr(item, "topic") else "internal"
        self.counts[kind] += 1
        self.verdicts[result.verdict] += 1
        self.times.append(time.perf_counter())
        return result


def _thread_cpu(thread) -> float:  # type: ignore[no-untyped-def]
    """CPU seconds of one thread of this process (Linux /proc), 0 if unknown."""
    import os

    try:
        stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError, IndexError, ValueError):
        return 0.0


def run(projects: int, rounds: int, sync: str, inflight: int) -> dict:
    broker = c.start_broker()
    tmp = Path(tempfile.mkdtemp(prefix="flops-bench-tp-"))
    try:
        c.announce_agents(broker.address)
        settings = Settings(
            data_dir=tmp, broker_url=broker.address.url, aggregator_ports=(20000, 40000), sqlite_synchronous=sync
        )
        store = SQLiteStore(tmp / "manager.sqlite3", sync)
        manager = CountingManager(settings, store, broker.address, client_id="bench-manager").start()
        # Let the retained agent statuses arrive before the load starts.
        time.sleep(0.5)
        manager.counts.clear()
        manager.times.clear()
        manager_cpu0 = _thread_cpu(manager._thread)
        cpu0 = time.process_time()
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        proc = ctx.Process(
            target=c.fast_workers,
            args=(broker.address.host, broker.address.port, projects, rounds, inflight, out),
            daemon=True,
        )
        proc.start()
        w = out.get(timeout=900)
        cpu = time.process_time() - cpu0
        manager_cpu = _thread_cpu(manager._thread) - manager_cpu0
        proc.join(10)
        times = manager.times
        events = len(times)
        span = times[-1] - times[0] if events > 1 else float("nan")
        # Per-second series from the first handled event.
        per_s: Counter[int] = Counter(int(t - times[0]) for t in times)
        series = [per_s[i] for i in range(max(per_s) + 1)] if per_s else []
        # Steady state: seconds that are neither the first nor the last (ramp up / drain).
        steady = series[1:-1] or series
        result = {
            "projects": projects,
            "rounds": rounds,
            "synchronous": sync,
            "inflight": inflight,
            "events": events,
            "events_by_kind": dict(manager.counts),
            "verdicts": dict(manager.verdicts),
            "span_s": round(span, 3),
            "events_per_s": round(events / span, 1),
            "per_second_series": series,
            "steady_median_per_s": sorted(steady)[len(steady) // 2] if steady else None,
            # CPU of this process (manager worker + paho thread; the GIL lets one run at a time) per event:
            # the ceiling one core could reach, whatever else runs on the machine.
            "process_cpu_s": round(cpu, 3),
            "manager_thread_cpu_s": round(manager_cpu, 3),
            "process_cpu_us_per_event": round(cpu / events * 1e6, 1),
            "manager_thread_cpu_us_per_event": round(manager_cpu / events * 1e6, 1),
            "cpu_bound_events_per_s": round(events / cpu, 1),
            "finished": w["finished"],
            "outcomes": w["outcomes"],
            "submit_to_all_finished_s": round(w["t_done"] - w["t_submit"], 3),
            "all_finished": w["ok"],
        }
        manager.stop()
        return result
    finally:
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200 projects")
    ap.add_argument("--projects", type=int)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sync", choices=["FULL", "NORMAL"], default="FULL")
    ap.add_argument("--inflight", type=int, default=1000)
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--cprofile", metavar="FILE", help="cProfile the manager's worker thread into FILE")
    ap.add_argument("--proposed", action="store_true", help="apply the fixes proposed outside benchmarks/")
    args = ap.parse_args()
    projects = args.projects or (200 if args.quick else 1000)
    c.quiet_logs(args.log_level)
    proposed = c.apply_proposed_fixes() if args.proposed else []
    CountingManager.profile = args.cprofile
    r = run(projects, args.rounds, args.sync, args.inflight)
    print(f"\nthroughput: {projects} concurrent projects, {args.rounds} rounds, SQLite synchronous={args.sync}")
    print(f"proposed fixes applied in-process: {proposed or 'none'}\n")
    c.table(
        [
            ["events handled", r["events"], ""],
            ["  by kind", ", ".join(f"{k}={v}" for k, v in sorted(r["events_by_kind"].items())), ""],
            ["first->last event (s)", r["span_s"], ""],
            ["sustained events/s", r["events_per_s"], ">= 5000"],
            ["median of steady seconds", r["steady_median_per_s"], ""],
            ["per-second series", " ".join(map(str, r["per_second_series"])), ""],
            ["process CPU per event (us)", r["process_cpu_us_per_event"], ""],
            ["  manager thread CPU per event (us)", r["manager_thread_cpu_us_per_event"], ""],
            ["events/s if CPU-bound on one core", r["cpu_bound_events_per_s"], ""],
            ["projects finished", f"{r['finished']}/{projects} {r['outcomes']}", ""],
            ["submit -> all finished (s)", r["submit_to_all_finished_s"], ""],
        ],
        ["metric", "value", "target"],
    )
    c.record(
        "throughput",
        args.quick,
        {**r, "log_level": args.log_level, "proposed_fixes": proposed, "target_events_per_s": 5000},
    )


if __name__ == "__main__":
    main()
