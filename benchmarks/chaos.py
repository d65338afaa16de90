"""Chaos: small projects on a real fleet while the manager, an agent and the broker are killed at random.

Every part is real: Mosquitto on a fixed port without persistence (the development broker, restarted empty),
``flops manager`` (SQLite in a temp dir), three ``flops agent`` processes (node-0 every role, node-1/2
learners), scikit-learn's digits pushed to them, the example ML repo with 2 rounds and tight per-stage
deadlines, every 4th project with both post-training steps.

1. Request -> reply latency with 10,000 stored (finished) projects, and with an empty store in the same run:
   a manager with no agents answers 200 requests one at a time, alternately an invalid SLA (a field-error
   reply) and a valid SLA with a bogus repo (a project created, failed later when the repo does not resolve).
2. One warm-up project without faults (builds the learners' environment once).
3. N projects, at most ``--concurrency`` in flight, submitted by a client that retries with the same request
   id while the broker or manager is away. Meanwhile a chaos thread (seeded) waits a random interval, picks
   a victim (manager, one agent, broker) and a signal (SIGTERM, SIGKILL), kills it, keeps it away for a
   random outage and starts it again (same port, data directory, agent id); one fault at a time.

Each project ends as: completed; failed with a true reason (it names the agent that was killed, "offline",
"restarted", or it timed out / a child exited while a fault fell in the project's window); failed
unexplained; or hung (not finished HUNG_MARGIN_S after the deadline of the stage it sat in: must be 0).
Also reported: commands acted on more than once (agents log "command accepted" once per execution, across
restarts), processes still running for finished projects while the fleet is up (a project's model server
excepted), and orphans once everything is stopped (/proc scanned for project ids: must be 0).

    python benchmarks/chaos.py [--quick] [--projects N] [--seed S] [--concurrency K] [--stored N] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as c

from flops import topics
from flops.broker import MosquittoBroker
from flops.client import Client
from flops.data.ops import mock
from flops.demo import EXAMPLE_SLA, example_repo
from flops.errors import FlopsError
from flops.lifecycle_stages import Outcome, Stage
from flops.logs import configure as configure_logs
from flops.messages import ProjectState
from flops.settings import BrokerAddress
from flops.sla import ProjectSLA
from flops.store import ProjectRecord, Transition
from flops.store_sqlite import SQLiteStore
from tests.base_support import ProjectFeed, free_port_range, project_processes
from tests.fleet_support import RestartableBroker
from tests.support import AgentProc, ManagerProcess

LEARNERS = ("node-0", "node-1", "node-2")
ROUNDS = 2
# Per-stage deadlines (s) in every project's SLA: a broken project fails within a bounded time.
DEADLINES = {
    "preparation": 60.0,
    "start": 60.0,
    "builder": 300.0,
    "learners": 120.0,
    "aggregation": 180.0,
    "post_training": 180.0,
}
HUNG_MARGIN_S = 60.0  # past the deadline of the stage it sits in, an unfinished project is hung
SUBMIT_GIVE_UP_S = 180.0
CLEANUP_TIMEOUT_S = 60.0  # stop_project and the agents' own stop: SIGTERM, a grace period, SIGKILL
FAULT_EVERY_S = (10.0, 30.0)
OUTAGE_S = (1.0, 5.0)
SERVE = "flops.runtime.serve"  # a completed project's model server runs on by design


def log(t0: float, message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - t0:6.1f}s] {message}", flush=True)


# --- the fleet ---------------------------------------------------------------------------------------


class Fleet:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.broker = RestartableBroker()
        self.address = self.broker.address
        self.feed = ProjectFeed(self.address)
        ports = free_port_range(200)
        self.manager = ManagerProcess(self.address, tmp / "manager", {"FLOPS_AGGREGATOR_PORTS": json.dumps(ports)})
        self.agents = {
            a: AgentProc(
                a, tmp / "agents" / a, "learner,builder,aggregator,serve" if i == 0 else "learner", self.address
            )
            for i, a in enumerate(LEARNERS)
        }
        self.repo_url = example_repo(tmp)
        self.stopped = False

    def start(self) -> None:
        self.manager.start(timeout=60)
        for agent in self.agents.values():
            agent.start()
        statuses = self.feed.wait_agents(list(LEARNERS), timeout=120)
        mock(
            "digits",
            len(LEARNERS),
            "digits",
            [statuses[a].data_server for a in LEARNERS],
            tokens=[self.agents[a].data_token() for a in LEARNERS],
        )
        self.feed.wait_agents(list(LEARNERS), timeout=60, tag="digits")

    def sla(self, post_training: bool) -> dict[str, Any]:
        body = json.loads(EXAMPLE_SLA.read_text())
        body["ml_repo_url"] = self.repo_url
        body["training_configuration"].update(
            training_rounds=ROUNDS, min_available_clients=3, min_fit_clients=3, min_evaluate_clients=3
        )
        body["deadlines"] = DEADLINES
        if not post_training:
            body["post_training_steps"] = []
        return body

    def proc_of(self, victim: str) -> subprocess.Popen[bytes] | None:
        return self.manager.proc if victim == "manager" else self.agents[victim].proc

    def kill(self, victim: str, sig: signal.Signals) -> str:
        """Send ``sig``; wait until the victim is gone. Returns a note when it had to be forced."""
        if victim == "broker":
            self.broker.down(sig)
            return ""
        proc = self.proc_of(victim)
        assert proc is not None
        proc.send_signal(sig)
        try:
            proc.wait(30)
            return ""
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            return f"{victim} still running 30 s after {sig.name}: killed"

    def restart(self, victim: str) -> None:
        if victim == "broker":
            self.broker.up()
        elif victim == "manager":
            self.manager.start(timeout=60)
        else:
            self.agents[victim].start()

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        for agent in self.agents.values():
            agent.stop()
        self.manager.stop()
        self.feed.close()
        self.broker.stop()


# --- the chaos thread ----------------------------------------------------------------------------------


@dataclass
class Fault:
    victim: str
    signal: str
    killed_at: float
    back_at: float
    outage_s: float
    note: str = ""


class Chaos(threading.Thread):
    """One fault at a time: wait, kill a random victim with a random signal, keep it away, start it again."""

    def __init__(self, fleet: Fleet, rng: random.Random, t0: float) -> None:
        super().__init__(name="chaos", daemon=True)
        self.fleet = fleet
        self.rng = rng
        self.t0 = t0
        self.faults: list[Fault] = []
        self.failures: list[str] = []  # the harness could not restart a victim
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.rng.uniform(*FAULT_EVERY_S)):
            try:
                self.one()
            except Exception as exc:  # a harness problem: reported, and the run goes on without more faults
                self.failures.append(f"{type(exc).__name__}: {exc}")
                log(self.t0, f"chaos thread stopped: {type(exc).__name__}: {exc}")
                return

    def one(self) -> None:
        kind = self.rng.choice(["manager", "agent", "broker"])
        victim = self.rng.choice(LEARNERS) if kind == "agent" else kind
        sig = self.rng.choice([signal.SIGTERM, signal.SIGKILL])
        outage = self.rng.uniform(*OUTAGE_S)
        killed_at = time.time()
        note = self.fleet.kill(victim, sig)
        gone_s = time.time() - killed_at
        time.sleep(outage)  # the outage itself: part of the scenario, not a synchronisation
        for attempt in range(3):
            try:
                self.fleet.restart(victim)
                break
            except Exception as exc:  # a harness problem, reported with the results
                note += f" restart {attempt + 1} failed: {type(exc).__name__}: {str(exc)[:200]}"
                time.sleep(5.0)
        else:
            self.failures.append(f"{victim}: {note}")
        fault = Fault(victim, sig.name, killed_at, time.time(), outage, note.strip())
        self.faults.append(fault)
        log(
            self.t0,
            f"FAULT {sig.name:7} {victim:8} gone after {gone_s:4.1f} s, away {outage:3.1f} s, "
            f"back after {fault.back_at - killed_at:4.1f} s {note}",
        )


# --- projects ------------------------------------------------------------------------------------------


@dataclass
class Run:
    index: int
    request_id: str
    post_training: bool
    project_id: str | None = None
    submit_tries: int = 0
    submit_error: str | None = None
    submitted_at: float = 0.0
    ended_at: float = 0.0
    state: ProjectState | None = None
    hung: bool = False
    verdict: str = ""
    faults: list[str] = field(default_factory=list)


def submit(address: BrokerAddress, body: dict[str, Any], run: Run) -> None:
    """Submit until a reply comes; the same request id every time, so the manager's dedup makes it safe."""
    sla = ProjectSLA.model_validate(body)
    give_up = time.monotonic() + SUBMIT_GIVE_UP_S
    run.submitted_at = time.time()
    while True:
        run.submit_tries += 1
        try:
            with Client(address) as client:
                reply = client.submit(sla, request_id=run.request_id, timeout=10.0)
        except (FlopsError, OSError) as exc:  # broker or manager away
            if time.monotonic() > give_up:
                run.submit_error = f"{type(exc).__name__}: {exc}"
                return
            time.sleep(1.0)
            continue
        if reply.errors:
            run.submit_error = "; ".join(f"{e.field}: {e.message}" for e in reply.errors)
        run.project_id = reply.project_id
        return


def follow(feed: ProjectFeed, run: Run) -> None:
    """Until the project is finished, or hung: unfinished HUNG_MARGIN_S past its current stage's deadline."""
    assert run.project_id is not None
    budget = run.submitted_at + sum(DEADLINES.values()) + HUNG_MARGIN_S
    while True:
        state = feed.state(run.project_id)
        now = time.time()
        if state is not None and state.stage is Stage.FINISHED:
            run.state, run.ended_at = state, now
            return
        stuck = state is not None and state.deadline_at is not None and now > state.deadline_at + HUNG_MARGIN_S
        if stuck or now > budget:
            run.state, run.ended_at, run.hung = state, now, True
            return
        time.sleep(0.5)  # polling the feed's latest state; the deadline passing has no event to wait on


def project(fleet: Fleet, run: Run, t0: float) -> Run:
    submit(fleet.address, fleet.sla(run.post_training), run)
    if run.project_id is None or run.submit_error:
        log(t0, f"project {run.index}: not submitted ({run.submit_tries} tries): {run.submit_error}")
        run.ended_at = time.time()
        return run
    log(t0, f"project {run.index}: {run.project_id} submitted ({run.submit_tries} tries)")
    follow(fleet.feed, run)
    s = run.state
    what = "HUNG" if run.hung else (s.outcome.value if s and s.outcome else "?")
    where = f" in {s.stage.value}" if run.hung and s else ""
    reason = f": {s.reason.splitlines()[0][:160]}" if s and s.reason and not run.hung else ""
    log(
        t0, f"project {run.index}: {run.project_id} {what}{where} after {run.ended_at - run.submitted_at:.0f} s{reason}"
    )
    return run


def first_line(run: Run, width: int = 90) -> str:
    text = (run.state.reason if run.state else None) or run.submit_error or ""
    return text.splitlines()[0][:width] if text else ""


def classify(run: Run, faults: list[Fault]) -> str:
    """completed / true / unexplained / hung / not submitted / cancelled, for one project."""
    if run.project_id is None:
        return "not submitted"
    if run.hung:
        return "hung"
    window = [f for f in faults if f.killed_at <= run.ended_at and f.back_at >= run.submitted_at - 30.0]
    run.faults = [f"{f.signal} {f.victim}" for f in window]
    assert run.state is not None and run.state.outcome is not None
    if run.state.outcome is Outcome.COMPLETED:
        return "completed"
    if run.state.outcome is Outcome.CANCELLED:
        return "cancelled"
    reason = (run.state.reason or "").lower()
    agents_hit = {f.victim for f in window if f.victim in LEARNERS}
    if any(a in reason for a in agents_hit):
        return "true"  # names the agent that was killed
    explains = ("offline", "restarted", "timed out in", "exited with code", "no longer runs", "gone")
    if window and any(word in reason for word in explains):
        return "true"
    return "unexplained"


def commands_acted(agent_homes: list[Path]) -> tuple[Counter[str], int]:
    """How often each command id was acted on ("command accepted" lines, across restarts), and how many
    redeliveries the agents recognised and ignored."""
    acted: Counter[str] = Counter()
    ignored = 0
    for home in agent_homes:
        for path in sorted(home.glob("agent-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if not line.startswith("{"):
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("event") == "command accepted":
                    acted[f"{home.name}/{entry.get('command_id')}"] += 1
                elif entry.get("event") == "duplicate command ignored":
                    ignored += 1
    return acted, ignored


def running_of(project_ids: list[str], allow_serve: set[str]) -> dict[str, list[str]]:
    found = {}
    for pid in project_ids:
        procs = [p for p in project_processes(pid) if not (pid in allow_serve and SERVE in p.cmdline)]
        if procs:
            found[pid] = [str(p) for p in procs]
    return found


def wait_none_running(project_ids: list[str], allow_serve: set[str], timeout: float) -> dict[str, list[str]]:
    deadline = time.monotonic() + timeout
    while True:
        found = running_of(project_ids, allow_serve)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(1.0)  # polling /proc: a process ending has no event to wait on


# --- request -> reply with many stored projects --------------------------------------------------------


def stored_sla() -> dict[str, Any]:
    body = json.loads(EXAMPLE_SLA.read_text())
    body["ml_repo_url"] = "file:///nonexistent/chaos-bench/digits.git"
    return ProjectSLA.model_validate(body).model_dump(mode="json", by_alias=True)


def prefill(path: Path, n: int) -> float:
    """``n`` finished projects (completed and failed, with transitions and seen ids), finished over the
    last three days (inside the retention, so the manager's prune keeps them)."""
    started = time.perf_counter()
    store = SQLiteStore(path)
    sla = stored_sla()
    now = time.time()
    edges = [
        (None, Stage.PREPARATION, "create"),
        (Stage.PREPARATION, Stage.START, "prepared"),
        (Stage.START, Stage.BUILDER, "started"),
        (Stage.BUILDER, Stage.LEARNERS, "built"),
        (Stage.LEARNERS, Stage.AGGREGATION, "learners_ready"),
        (Stage.AGGREGATION, Stage.FINISHED, "trained"),
    ]
    with store.batch(), store.unit() as unit:
        for i in range(n):
            pid, rid = f"p-stored-{i:06d}", f"r-stored-{i:06d}"
            created = now - 3 * 86400 * (1 - i / n)
            failed = i % 10 == 0
            stamps = {f"{dest.value}_at": created + k * 5 for k, (_, dest, _) in enumerate(edges)}
            unit.insert(
                ProjectRecord(
                    project_id=pid,
                    stage=Stage.FINISHED,
                    sla=sla,
                    created_at=created,
                    stage_entered_at=created + 25,
                    outcome=Outcome.FAILED if failed else Outcome.COMPLETED,
                    reason="timed out in aggregation after 180 s" if failed else "completed",
                    failed_stage=Stage.AGGREGATION if failed else None,
                    ctx={"progress": {"round": ROUNDS, "rounds": ROUNDS, "accuracy": 0.9}},
                    timestamps=stamps,
                    seq=12,
                    request_id=rid,
                )
            )
            unit.mark_seen(f"req:{rid}", pid, pid)
            for k, (source, dest, trigger) in enumerate(edges):
                unit.log_transition(Transition(pid, source, dest, trigger, f"e-{pid}-{k}", created + k * 5))
            for k in range(10):
                unit.mark_seen(f"e-{pid}-r{k}", pid, "accept")
    store.close()
    return time.perf_counter() - started


def reply_latency(tmp: Path, stored: int, requests: int) -> dict[str, Any]:
    """A manager (no agents) on its own broker; ``requests`` sequential request -> reply round trips."""
    broker = MosquittoBroker()
    data = tmp / f"latency-{stored}"
    data.mkdir(parents=True)
    fill_s = prefill(data / "manager.sqlite3", stored) if stored else 0.0
    manager = ManagerProcess(broker.address, data, {"FLOPS_AGGREGATOR_PORTS": json.dumps(free_port_range())})
    replies: dict[str, float] = {}
    cond = threading.Condition()

    def on_reply(topic: str, payload: bytes, t: float) -> None:
        with cond:
            replies[json.loads(payload)["request_id"]] = t
            cond.notify_all()

    client = None
    try:
        t_start = time.perf_counter()
        manager.start(timeout=120)
        online_s = time.perf_counter() - t_start
        replies_topic = f"{topics.PREFIX}/customers/+/requests/+/reply"
        client = c.Raw(broker.address, "bench-chaos-rtt", [replies_topic], on_reply)
        valid = stored_sla()
        invalid = {**valid, "training_configuration": {**valid["training_configuration"], "training_rounds": 0}}
        times: dict[str, list[float]] = {"invalid": [], "valid": []}
        first_reply_s = None
        for i in range(requests + 4):  # the first 4 warm up (the 10,000 retained states go out at connect)
            kind = "invalid" if i % 2 == 0 else "valid"
            rid = f"rtt-{stored}-{i}-{os.getpid()}"
            body = json.dumps({"request_id": rid, "sla": invalid if kind == "invalid" else valid}).encode()
            sent = time.perf_counter()
            client.publish(topics.requests(valid["customerID"]), body)
            with cond:
                if not cond.wait_for(lambda r=rid: r in replies, 60):
                    raise RuntimeError(f"no reply to {rid} within 60 s")
            if first_reply_s is None:
                first_reply_s = replies[rid] - t_start
            if i >= 4:
                times[kind].append((replies[rid] - sent) * 1000)
        both = times["invalid"] + times["valid"]
        return {
            "stored": stored,
            "prefill_s": round(fill_s, 2),
            "start_to_online_s": round(online_s, 2),
            "start_to_first_reply_s": round(first_reply_s or 0.0, 2),
            "n": len(both),
            "p50_ms": round(c.pct(both, 50), 2),
            "p99_ms": round(c.pct(both, 99), 2),
            **{f"{k}_p50_ms": round(c.pct(v, 50), 2) for k, v in times.items()},
            **{f"{k}_p99_ms": round(c.pct(v, 99), 2) for k, v in times.items()},
        }
    finally:
        if client is not None:
            client.close()
        manager.stop()
        broker.stop()


# --- main ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 projects, 2 in flight, 1,000 stored")
    ap.add_argument("--projects", type=int, help="projects under chaos (default 20)")
    ap.add_argument("--concurrency", type=int, help="projects in flight at most (default 3)")
    ap.add_argument("--stored", type=int, help="finished projects in the store for the latency part (10,000)")
    ap.add_argument("--requests", type=int, default=200, help="timed request -> reply round trips per store")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (kept anyway when something is wrong)")
    args = ap.parse_args()
    configure_logs("console", "warning")  # the harness's own clients: warnings only
    n_projects = args.projects or (4 if args.quick else 20)
    concurrency = args.concurrency or (2 if args.quick else 3)
    stored = args.stored if args.stored is not None else (1000 if args.quick else 10_000)
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="flops-bench-chaos-"))
    t0 = time.time()
    print(f"chaos: {n_projects} projects, {concurrency} in flight, seed {args.seed}, work dir {tmp}\n")

    # 1. request -> reply latency: empty store (baseline) and `stored` finished projects, same run.
    latency = [reply_latency(tmp, 0, args.requests), reply_latency(tmp, stored, args.requests)]
    base, full = latency
    c.table(
        [
            [
                f"{r['stored']:,}",
                r["start_to_online_s"],
                r["start_to_first_reply_s"],
                r["n"],
                r["p50_ms"],
                r["p99_ms"],
                r["invalid_p50_ms"],
                r["valid_p50_ms"],
            ]
            for r in latency
        ],
        ["stored", "start->online s", "start->1st reply s", "n", "p50 ms", "p99 ms", "invalid p50", "valid p50"],
    )
    ratio50 = full["p50_ms"] / base["p50_ms"] if base["p50_ms"] else float("nan")
    ratio99 = full["p99_ms"] / base["p99_ms"] if base["p99_ms"] else float("nan")
    print(f"ratio to the empty store: p50 {ratio50:.2f}, p99 {ratio99:.2f}\n")

    # 2. + 3. the fleet, a warm-up project, then the projects under chaos.
    fleet = Fleet(tmp)
    chaos = Chaos(fleet, rng, t0)
    runs = [Run(i, f"chaos-{args.seed}-{i}-{os.getpid()}", post_training=i % 4 == 3) for i in range(n_projects)]
    warm = Run(-1, f"chaos-warm-{os.getpid()}", post_training=False)
    result: dict[str, Any] = {}
    try:
        fleet.start()
        log(t0, "fleet up; warm-up project (no faults)")
        project(fleet, warm, t0)
        chaos.start()
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="project") as pool:
            list(pool.map(lambda r: project(fleet, r, t0), runs))
        chaos.halt.set()
        chaos.join()
        log(t0, f"projects done; {len(chaos.faults)} faults; checking the fleet")
        for r in runs:
            r.verdict = classify(r, chaos.faults)
        verdicts = Counter(r.verdict for r in runs)

        # Processes of finished projects while the fleet still runs (a model server excepted).
        with_model = {r.project_id for r in [warm, *runs] if r.project_id and r.state and r.state.model_url}
        ids = [r.project_id for r in [warm, *runs] if r.project_id]
        try:
            fleet.feed.wait_agents(list(LEARNERS), timeout=60)
        except AssertionError as exc:
            log(t0, f"not every agent is back online: {exc}")
        finished = [r.project_id for r in [warm, *runs] if r.project_id and not r.hung]
        leaks = wait_none_running(finished, with_model, CLEANUP_TIMEOUT_S)
        acted, ignored = commands_acted([a.home for a in fleet.agents.values()])
        duplicated = {k: n for k, n in acted.items() if n > 1}
        on_bus = Counter(cmd.command_id for pid in ids for cmd in fleet.feed.commands(pid))

        fleet.stop()
        orphans = wait_none_running(ids, set(), CLEANUP_TIMEOUT_S)

        signals = Counter(f"{f.signal} {'agent' if f.victim in LEARNERS else f.victim}" for f in chaos.faults)
        durations = [r.ended_at - r.submitted_at for r in runs if r.project_id and not r.hung]
        result = {
            "projects": n_projects,
            "concurrency": concurrency,
            "seed": args.seed,
            "rounds": ROUNDS,
            "deadlines": DEADLINES,
            "completed": verdicts["completed"],
            "failed_true_reason": verdicts["true"],
            "failed_unexplained": verdicts["unexplained"],
            "hung": verdicts["hung"],
            "not_submitted": verdicts["not submitted"],
            "cancelled": verdicts["cancelled"],
            "faults": len(chaos.faults),
            "faults_by_kind": dict(signals),
            "fault_log": [
                {
                    "victim": f.victim,
                    "signal": f.signal,
                    "at_s": round(f.killed_at - t0, 1),
                    "outage_s": round(f.outage_s, 1),
                    "note": f.note,
                }
                for f in chaos.faults
            ],
            "harness_restart_failures": chaos.failures,
            "submit_retries": sum(max(0, r.submit_tries - 1) for r in runs),
            "commands_acted": len(acted),
            "commands_duplicated": len(duplicated),
            "duplicates": duplicated,
            "redeliveries_ignored": ignored,
            "command_messages_on_bus": sum(on_bus.values()),
            "command_ids_on_bus": len(on_bus),
            "finished_projects_still_running": {k: len(v) for k, v in leaks.items()},
            "orphans": sum(len(v) for v in orphans.values()),
            "orphan_list": orphans,
            "project_s_p50": round(c.pct(durations, 50), 1),
            "project_s_max": round(max(durations, default=0.0), 1),
            "warmup": {"outcome": warm.state.outcome.value if warm.state and warm.state.outcome else "?"},
            "outcomes": [
                {
                    "project_id": r.project_id,
                    "verdict": r.verdict,
                    "post_training": r.post_training,
                    "seconds": round(r.ended_at - r.submitted_at, 1),
                    "stage": r.state.stage.value if r.state else None,
                    "reason": r.state.reason if r.state else r.submit_error,
                    "faults_in_window": r.faults,
                }
                for r in runs
            ],
            "request_reply": {
                "empty": base,
                "stored": full,
                "p50_ratio": round(ratio50, 2),
                "p99_ratio": round(ratio99, 2),
            },
            "elapsed_s": round(time.time() - t0, 1),
        }

        print()
        c.table(
            [
                [
                    r.index,
                    r.project_id,
                    r.verdict,
                    f"{r.ended_at - r.submitted_at:.0f}",
                    ", ".join(f"{k} x{n}" for k, n in Counter(r.faults).items())[:60] or "-",
                    first_line(r),
                ]
                for r in runs
            ],
            ["#", "project", "end", "s", "faults in window", "reason"],
        )
        print()
        c.table(
            [
                ["faults injected", f"{result['faults']} {dict(signals)}", ""],
                ["completed", result["completed"], ""],
                ["failed, true reason", result["failed_true_reason"], ""],
                ["failed, unexplained", result["failed_unexplained"], "0"],
                ["hung", result["hung"], "0"],
                ["not submitted", result["not_submitted"], "0"],
                ["commands acted on twice", result["commands_duplicated"], "0"],
                [
                    "finished projects' processes still running",
                    sum(result["finished_projects_still_running"].values()),
                    "0",
                ],
                ["orphans after stop", result["orphans"], "0"],
                [f"request->reply p50 / p99 ms, {stored:,} stored", f"{full['p50_ms']} / {full['p99_ms']}", ""],
                ["request->reply p50 / p99 ms, empty store", f"{base['p50_ms']} / {base['p99_ms']}", ""],
            ],
            ["", "measured", "must be"],
        )
        c.record("chaos", args.quick, result)
        wrong = (
            result["failed_unexplained"]
            or result["hung"]
            or result["commands_duplicated"]
            or result["orphans"]
            or result["finished_projects_still_running"]
            or result["not_submitted"]
            or chaos.failures
        )
        if args.keep or wrong:
            print(f"logs kept in {tmp} (manager/manager-*.log, agents/<id>/agent-*.log, agents/<id>/work/)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        chaos.halt.set()
        if chaos.is_alive():
            chaos.join(120)
        fleet.stop()


if __name__ == "__main__":
    main()
