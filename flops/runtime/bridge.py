"""The hand-over inside a cluster aggregator between its two Flower roles (clustered hierarchical FL).

A cluster aggregator is a Flower client of the root (a SuperNode whose ClientApp receives the root's global
model once per cycle) and the server of its cluster's learners (a SuperLink whose ServerApp runs the cluster's
rounds). Both run on one host as children of the cluster aggregator process; this module passes each request
(train from these arrays for cycle c, or evaluate these arrays) from the ClientApp to the ServerApp and the
answer back, as files in one directory. A file is complete once renamed into place: ``<id>.req.npz`` then
``<id>.req.json``; the answer ``<id>.res.npz`` then ``<id>.res.json``. Ids are ``<kind>-<cycle>``, so a
message the root sends again is answered from the same files.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TRAIN = "train"
EVALUATE = "evaluate"


class BridgeError(RuntimeError):
    """The other side did not answer in time, or answered with an error (the message says which)."""


@dataclass(frozen=True)
class Request:
    id: str
    kind: str
    cycle: int
    arrays: list[np.ndarray]


def _write_arrays(path: Path, arrays: list[np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as out:
        np.savez(out, *arrays)
    os.replace(tmp, path)


def _read_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path) as archive:
        return [archive[f"arr_{i}"] for i in range(len(archive.files))]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


class Bridge:
    """One cluster aggregator's request directory."""

    def __init__(self, directory: Path, *, poll: float = 0.05) -> None:
        self.directory = directory
        self.poll = poll
        directory.mkdir(parents=True, exist_ok=True)

    # --- the ClientApp's side (asks) -------------------------------------------------------------------

    def ask(
        self, kind: str, cycle: int, arrays: list[np.ndarray], *, timeout: float
    ) -> tuple[list[np.ndarray], dict[str, Any]]:
        """Hand a request to the cluster's ServerApp and wait for its answer: (arrays, metrics)."""
        rid = f"{kind}-{cycle}"
        answer = self.directory / f"{rid}.res.json"
        if not answer.exists() and not (self.directory / f"{rid}.req.json").exists():
            _write_arrays(self.directory / f"{rid}.req.npz", arrays)
            _write_json(self.directory / f"{rid}.req.json", {"kind": kind, "cycle": cycle})
        deadline = time.monotonic() + timeout
        while not answer.exists():
            if time.monotonic() >= deadline:
                raise BridgeError(f"the cluster's {kind} for cycle {cycle} did not finish within {timeout:g} s")
            time.sleep(self.poll)
        meta = json.loads(answer.read_text(encoding="utf-8"))
        if meta.get("error"):
            raise BridgeError(str(meta["error"]))
        res_arrays = self.directory / f"{rid}.res.npz"
        return (_read_arrays(res_arrays) if res_arrays.exists() else []), dict(meta.get("metrics", {}))

    # --- the ServerApp's side (answers) ----------------------------------------------------------------

    def next_request(self, *, timeout: float) -> Request:
        """The oldest request not answered yet; waits up to ``timeout`` seconds for one."""
        deadline = time.monotonic() + timeout
        while True:
            pending = [
                p
                for p in self.directory.glob("*.req.json")
                if not (self.directory / p.name.replace(".req.json", ".res.json")).exists()
            ]
            if pending:
                path = min(pending, key=lambda p: p.stat().st_mtime_ns)
                rid = path.name.removesuffix(".req.json")
                meta = json.loads(path.read_text(encoding="utf-8"))
                arrays = _read_arrays(self.directory / f"{rid}.req.npz")
                return Request(rid, str(meta["kind"]), int(meta["cycle"]), arrays)
            if time.monotonic() >= deadline:
                raise BridgeError(f"no request from the root within {timeout:g} s")
            time.sleep(self.poll)

    def answer(
        self,
        request: Request,
        *,
        arrays: list[np.ndarray] | None = None,
        metrics: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        if arrays is not None:
            _write_arrays(self.directory / f"{request.id}.res.npz", arrays)
        _write_json(self.directory / f"{request.id}.res.json", {"metrics": metrics or {}, "error": error})
