"""Inference server for a packaged model (post-training step ``deploy_trained_model_image``).

``python -m flops.runtime.serve --package DIR [--host 127.0.0.1] [--port 0] [--advertise-host H]
[--token-file PATH] [--workers 4] [--queue 64] [--max-connections 256] [--timeout 30]
[--max-body-bytes N] [--report-fd FD]``

Reads the package's ``manifest.json`` (``flops.builder.model_package``), imports the repo's
``ModelManager`` from the package's code directory, sets the saved parameters (``model.npz``, the
aggregator's ``np.savez`` of the parameter list) and serves HTTP:

- ``GET /health`` (and MLflow's ``GET /ping``) → 200 ``{"status": "ok"}``;
- ``POST /invocations`` with an MLflow scoring body → 200 ``{"predictions": [...]}``. JSON bodies
  carry exactly one of ``inputs`` / ``instances`` (rows), ``dataframe_split`` (``columns`` + ``data``)
  or ``dataframe_records`` (list of objects); ``text/csv`` bodies are rows of values, with a header
  row when the first row is not all numbers. Rows of more than one dimension (8x8 images) are
  flattened, a single flat row is one sample.

Every answer is JSON (MLflow-style ``{"error_code", "message"}`` for errors): input it cannot use
(malformed JSON or CSV, nesting too deep, numbers too large, wrong shapes) → 400, oversized body → 413,
unknown media type → 415; only a bug is a 500, with a generic message and the traceback in the log.
With a token (``--token-file``, else ``$FLOPS_MODEL_TOKEN``) every endpoint but the health probes
wants ``Authorization: Bearer <token>`` (401 otherwise). A fixed pool of workers answers requests;
connections wait for a complete request head without a thread, a full queue is answered 503, and a
client slower than ``--timeout`` is dropped (``ModelServer``).

Once it listens it writes a ``model.served`` report ``{"url": "http://host:port/"}`` to
``--report-fd`` (stdout when absent); when the model (or the token file) cannot be loaded,
``model.failed`` ``{reason, log_tail}`` and exit status 1. SIGTERM / SIGINT stop it cleanly with
status 0. ``predict(url, rows, token=...)`` is the matching client.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hmac
import io
import json
import os
import queue
import selectors
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import FrameType
from typing import Any, Final

import numpy as np
import structlog

from flops.builder.model_package import DEFAULT_MODEL_FILE, MANIFEST
from flops.runtime.repo import RepoLoadError, new_model_manager, traceback_tail
from flops.runtime.reports import MODEL_FAILED, MODEL_SERVED, ReportWriter

DEFAULT_MAX_BODY_BYTES: Final = 16 * 1024 * 1024
DEFAULT_WORKERS: Final = 4
DEFAULT_QUEUE: Final = 64  # requests (heads read, bodies not) waiting for a worker; more are answered 503
DEFAULT_MAX_CONNECTIONS: Final = 256  # open connections; the stalest idle one makes room for a new one
DEFAULT_TIMEOUT_S: Final = 30.0  # for a request head to arrive, then for its body and answer
TOKEN_ENV: Final = "FLOPS_MODEL_TOKEN"
OPEN_PATHS: Final = frozenset({"/health", "/ping"})  # answered without a token (liveness probes)
MAX_HEAD_BYTES: Final = 64 * 1024
MAX_LENGTH_DIGITS: Final = 18
MAX_MESSAGE_CHARS: Final = 200
RECV_BYTES: Final = 256 * 1024
LISTEN_BACKLOG: Final = 128
LINGER_S: Final = 2.0  # a refused body is drained this long (and at most LINGER_BYTES) before closing
LINGER_BYTES: Final = 64 * 1024 * 1024
JSON_KEYS: Final = ("inputs", "instances", "dataframe_split", "dataframe_records")
CSV_TYPES: Final = frozenset({"text/csv", "application/csv"})
JSON_TYPES: Final = frozenset({"application/json", "text/json"})


class ModelLoadError(RuntimeError):
    """The package cannot be served (bad manifest, missing files, repo import failure); ``tail`` has details."""

    def __init__(self, reason: str, tail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.tail = tail


class BadInput(ValueError):
    """A scoring request the server refuses; ``status`` is the HTTP status, the message reaches the caller."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


class PredictError(RuntimeError):
    """``predict()`` got an error answer from the server; ``status`` is the HTTP status (0: unreachable)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# -- loading ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedModel:
    """The model object the server predicts with, and facts for its log lines."""

    model: Any
    package: Path
    model_file: Path


def read_manifest(package: Path) -> dict[str, Any]:
    path = package / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{package} is not a model package: no {MANIFEST}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return manifest


def _inside(package: Path, relative: object, what: str) -> Path:
    """``package / relative``, refusing names that leave the package (the manifest is data, not trusted code)."""
    if not isinstance(relative, str) or not relative:
        raise ModelLoadError(f"manifest: {what} must be a non-empty string, got {relative!r}")
    path = (package / relative).resolve()
    if not path.is_relative_to(package.resolve()):
        raise ModelLoadError(f"manifest: {what} {relative!r} points outside the package")
    return path


def load_parameters(path: Path) -> list[np.ndarray]:
    """The parameter list saved with ``np.savez(path, *arrays)``, in its original order."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = sorted(archive.files, key=lambda n: (len(n), n))  # arr_2 before arr_10
            return [archive[name] for name in names]
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read model parameters {path}: {exc}") from exc


def load_model(package: Path) -> LoadedModel:
    """Import the package's ``ModelManager``, set the saved parameters and return its model."""
    manifest = read_manifest(package)
    code_dir = _inside(package, manifest.get("code_dir", "code"), "code_dir")
    model_dir = _inside(package, manifest.get("model_dir", "model"), "model_dir")
    model_file = _inside(model_dir, manifest.get("model_file") or DEFAULT_MODEL_FILE, "model_file")
    if not model_file.is_file():
        raise ModelLoadError(f"model parameters not found: {model_file}")
    parameters = load_parameters(model_file)
    try:
        manager = new_model_manager(code_dir)
    except RepoLoadError as exc:
        raise ModelLoadError(f"cannot load ModelManager from {code_dir}", exc.tail) from exc
    try:
        manager.set_model_parameters(parameters)
        model = manager.get_model()
    except Exception as exc:
        raise ModelLoadError("ModelManager rejected the saved parameters", traceback_tail(exc)) from exc
    if not callable(getattr(model, "predict", None)):
        raise ModelLoadError(f"ModelManager.get_model() returned {type(model).__name__}, which has no predict()")
    return LoadedModel(model=model, package=package, model_file=model_file)


# -- request parsing --------------------------------------------------------------------------------------
def _media_type(content_type: str | None) -> str:
    return (content_type or "application/json").split(";", 1)[0].strip().lower()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _records_to_rows(records: object, what: str) -> tuple[list[str], list[list[Any]]]:
    """Columns (first-seen key order) and rows of a list of objects; a missing key is an error."""
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise BadInput(f"{what} must be a non-empty list of objects")
    columns = list(records[0])
    for i, record in enumerate(records):
        if set(record) != set(columns):
            raise BadInput(f"{what}[{i}] has keys {sorted(record)}, expected {sorted(columns)}")
    return columns, [[record[c] for c in columns] for record in records]


def parse_json_body(body: bytes) -> tuple[list[str] | None, Any]:
    """(column names or None, rows) of an MLflow JSON scoring body."""
    try:
        payload = json.loads(body)
    except RecursionError as exc:
        raise BadInput("body is not valid JSON: nested too deeply") from exc
    except ValueError as exc:  # also UnicodeDecodeError, and integers beyond Python's int-string limit
        raise BadInput(f"body is not valid JSON: {exc}") from exc
    keys = [k for k in JSON_KEYS if isinstance(payload, dict) and k in payload]
    if len(keys) != 1:
        raise BadInput(f"JSON body must be an object with exactly one of {list(JSON_KEYS)}")
    key = keys[0]
    value = payload[key]
    if key == "dataframe_records":
        return _records_to_rows(value, key)
    if key == "dataframe_split":
        if not isinstance(value, dict) or not isinstance(value.get("data"), list):
            raise BadInput('dataframe_split must be an object like {"columns": [...], "data": [[...], ...]}')
        columns = value.get("columns")
        if columns is not None and (
            not isinstance(columns, list) or not all(isinstance(c, str | int) for c in columns)
        ):
            raise BadInput("dataframe_split.columns must be a list of column names")
        return ([str(c) for c in columns] if columns is not None else None), value["data"]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return _records_to_rows(value, key)  # TF-serving style instances: one object per row
    if not isinstance(value, list):
        raise BadInput(f"{key} must be a list of rows (named tensors are not supported)")
    return None, value


def parse_csv_body(body: bytes) -> tuple[list[str] | None, list[list[str]]]:
    """(header or None, rows) of a CSV body; the first row is a header unless every cell is a number."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInput(f"CSV body is not UTF-8: {exc}") from exc
    try:
        rows = [row for row in csv.reader(io.StringIO(text)) if row]
    except csv.Error as exc:
        raise BadInput(f"body is not valid CSV: {exc}") from exc
    if not rows:
        raise BadInput("CSV body has no rows")
    if all(_is_number(cell) for cell in rows[0]):
        return None, rows
    return [c.strip() for c in rows[0]], rows[1:]


def expected_features(model: Any) -> int | None:
    """Features per row the model takes: sklearn's ``n_features_in_``, else a linear model's ``coef_`` width.

    Models whose parameters were set rather than fitted (every FL ModelManager) often lack ``n_features_in_``.
    """
    fitted = getattr(model, "n_features_in_", None)
    if isinstance(fitted, int | np.integer):
        return int(fitted)
    coef = getattr(model, "coef_", None)
    return int(coef.shape[-1]) if isinstance(coef, np.ndarray) and coef.ndim in (1, 2) else None


def to_features(rows: Any, columns: list[str] | None, model: Any) -> Any:
    """A 2-D array (or a DataFrame for models fitted on named columns) of the rows, checked against the model."""
    if not isinstance(rows, list) or not rows:
        raise BadInput("no rows to score: send at least one row")
    try:
        array = np.asarray(rows)
    except (ValueError, OverflowError, RecursionError) as exc:  # ragged nesting, more than 64 dimensions
        raise BadInput(f"rows must all have the same shape: {exc}") from exc
    if array.dtype == object:  # None (missing value) among numbers, integers beyond int64, nested objects
        try:
            array = array.astype(np.float64)
        except OverflowError as exc:
            raise BadInput("a number is too large for a 64-bit float") from exc
        except (TypeError, ValueError) as exc:
            raise BadInput("rows must all have the same shape and hold plain values") from exc
    if array.dtype.kind in "US":  # CSV cells, or JSON strings: numbers if they all parse
        with contextlib.suppress(ValueError, OverflowError):  # otherwise the model decides (e.g. a text pipeline)
            array = array.astype(np.float64)
    if array.ndim == 1:
        array = array.reshape(1, -1)  # one flat row is one sample
    elif array.ndim > 2:
        array = array.reshape(array.shape[0], -1)  # e.g. 8x8 images → 64 features
    if columns is not None and len(columns) != array.shape[1]:
        raise BadInput(f"{len(columns)} column names for rows of {array.shape[1]} values")
    expected = expected_features(model)
    if expected is not None and array.shape[1] != expected:
        raise BadInput(f"each row must have {expected} features, got {array.shape[1]}")
    names = getattr(model, "feature_names_in_", None)
    if names is None:
        return array
    import pandas as pd  # only models fitted on a DataFrame need one back

    names = [str(n) for n in names]
    if columns is None:
        return pd.DataFrame(array, columns=names)
    missing = sorted(set(names) - set(columns))
    if missing:
        raise BadInput(f"missing columns {missing}; the model expects {names}")
    return pd.DataFrame(array, columns=columns)[names]


def score(model: Any, body: bytes, content_type: str | None) -> tuple[list[Any], int]:
    """Predictions for one scoring request body, and the number of rows scored."""
    media = _media_type(content_type)
    if media in JSON_TYPES:
        columns, rows = parse_json_body(body)
    elif media in CSV_TYPES:
        columns, rows = parse_csv_body(body)
    else:
        raise BadInput(
            f"unsupported content type {media!r}; send application/json or text/csv",
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
        )
    features = to_features(rows, columns, model)
    try:
        predictions = model.predict(features)
    except (ValueError, TypeError, OverflowError) as exc:  # sklearn's way of refusing input
        raise BadInput(f"the model rejected the input: {exc}") from exc
    return np.asarray(predictions).tolist(), len(features)


# -- HTTP -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """How much the server gives strangers: workers, waiting requests, open connections, time and bytes."""

    workers: int = DEFAULT_WORKERS
    queue: int = DEFAULT_QUEUE
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    timeout: float = DEFAULT_TIMEOUT_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


class _Connection:
    """One client socket and the bytes read from it but not yet consumed.

    The event loop owns it while it waits for a request head (or lingers before closing); a worker owns it
    while it answers one request, reading through ``readline``/``read`` against ``deadline`` and writing
    through ``write`` with a timeout, so a slow client holds a worker for at most one timeout.
    """

    def __init__(self, sock: socket.socket, address: Any) -> None:
        self.sock = sock
        self.address = address
        self.buffer = bytearray()
        self.deadline = 0.0
        self.write_timeout = DEFAULT_TIMEOUT_S
        self.state = "idle"  # idle (awaiting a head) | busy (a worker has it) | linger (draining, then closed)
        self.drained = 0

    def head_complete(self) -> bool:
        return b"\r\n\r\n" in self.buffer or b"\n\n" in self.buffer

    def _take(self, size: int) -> bytes:
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def _fill(self) -> bool:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request not received within the socket timeout")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(RECV_BYTES)
        self.buffer += chunk
        return bool(chunk)

    def readline(self, limit: int = -1) -> bytes:
        while (end := self.buffer.find(b"\n")) < 0:
            if 0 <= limit <= len(self.buffer) or not self._fill():
                end = len(self.buffer) - 1
                break
        size = end + 1
        return self._take(min(size, limit) if limit >= 0 else size)

    def read(self, size: int) -> bytes:
        while len(self.buffer) < size and self._fill():
            pass
        return self._take(min(size, len(self.buffer)))

    def write(self, data: bytes) -> int:
        self.sock.settimeout(self.write_timeout)
        self.sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        """Writes are unbuffered."""


def _clip(text: str) -> str:
    """Messages and logged paths may echo the client's input: keep them short."""
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


def _error_response(status: HTTPStatus, message: str) -> bytes:
    """A complete ``Connection: close`` error answer, for the event loop (which has no handler)."""
    body = json.dumps({"error_code": status.name, "message": message}, separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class ModelServer:
    """Serves one loaded model with a fixed pool of workers.

    One event loop (the thread calling ``serve_forever``) accepts connections and holds them until a
    complete request head has arrived, so clients that connect and send nothing, or trickle their headers,
    cost a file descriptor, never a thread; they are dropped after ``timeout``. A complete head goes to a
    worker if one of ``workers + queue`` slots is free, else it is answered 503 at once. A worker answers
    one request and hands a kept-alive connection back to the loop. Connections are closed by lingering:
    write side shut, unread input drained for a moment, so a client still sending a refused body gets the
    answer rather than a reset.
    """

    def __init__(
        self, address: tuple[str, int], loaded: LoadedModel, *, limits: Limits | None = None, token: str | None = None
    ) -> None:
        self.loaded = loaded
        self.limits = limits = limits or Limits()
        self.max_body_bytes = limits.max_body_bytes
        self.token = token
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._listener = socket.create_server(address, family=family, backlog=LISTEN_BACKLOG)
        self._listener.setblocking(False)
        self.server_address: tuple[str, int] = self._listener.getsockname()[:2]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._slots = threading.BoundedSemaphore(limits.workers + limits.queue)
        self._pool = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="serve-worker")
        self._handbacks: queue.SimpleQueue[tuple[_Connection, bool]] = queue.SimpleQueue()
        self._open: set[_Connection] = set()
        self._stopping = threading.Event()
        self._log = structlog.get_logger(__name__)

    def __enter__(self) -> ModelServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server_close()

    def shutdown(self) -> None:
        """Make ``serve_forever`` return; safe from a signal handler and from any thread."""
        self._stopping.set()
        self._wake()

    def server_close(self) -> None:
        self._selector.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()

    def serve_forever(self, poll_interval: float = 0.25) -> None:
        while not self._stopping.is_set():
            for key, _events in self._selector.select(poll_interval):
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                elif key.data.state == "idle":
                    self._receive_head(key.data)
                else:
                    self._drain(key.data)
            self._take_handbacks()
            self._expire()
        self._stop_all()

    # -- event loop ---------------------------------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(LISTEN_BACKLOG):
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: drop this round, keep serving
                self._log.warning("accept.failed", error=str(exc))
                return
            sock.setblocking(False)
            if len(self._open) >= self.limits.max_connections and not self._evict_idle():
                with contextlib.suppress(OSError):
                    sock.send(_error_response(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections"))
                sock.close()
                continue
            conn = _Connection(sock, address)
            conn.deadline = time.monotonic() + self.limits.timeout
            conn.write_timeout = self.limits.timeout
            self._open.add(conn)
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _evict_idle(self) -> bool:
        """Close the idle connection closest to its deadline, to make room for a new one."""
        idle = [c for c in self._open if c.state == "idle"]
        if not idle:
            return False
        self._close(min(idle, key=lambda c: c.deadline))
        return True

    def _receive_head(self, conn: _Connection) -> None:
        try:
            chunk = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not chunk:
            self._close(conn)
            return
        conn.buffer += chunk
        if conn.head_complete():
            self._dispatch(conn)
        elif len(conn.buffer) > MAX_HEAD_BYTES:
            self._refuse(
                conn, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"request head exceeds {MAX_HEAD_BYTES} bytes"
            )

    def _dispatch(self, conn: _Connection) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(conn, HTTPStatus.SERVICE_UNAVAILABLE, "the server is busy; retry later")
            return
        self._selector.unregister(conn.sock)
        conn.state = "busy"
        self._pool.submit(self._work, conn)

    def _refuse(self, conn: _Connection, status: HTTPStatus, message: str) -> None:
        """Answer from the event loop (no worker) and close."""
        self._log.warning("request.refused", status=int(status), error=message, client=conn.address[0])
        with contextlib.suppress(OSError):
            conn.sock.send(_error_response(status, message))
        self._linger(conn)

    def _linger(self, conn: _Connection) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.sock.setblocking(False)
        conn.deadline = time.monotonic() + min(self.limits.timeout, LINGER_S)
        if conn.state == "busy":
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        conn.state = "linger"

    def _drain(self, conn: _Connection) -> None:
        try:
            while chunk := conn.sock.recv(RECV_BYTES):
                conn.drained += len(chunk)
                if conn.drained > LINGER_BYTES:
                    break
            else:
                self._close(conn)  # the client closed its side
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._close(conn)

    def _take_handbacks(self) -> None:
        while True:
            try:
                conn, keep = self._handbacks.get_nowait()
            except queue.Empty:
                return
            if not keep:
                self._linger(conn)
                continue
            conn.sock.setblocking(False)
            conn.state = "idle"
            conn.deadline = time.monotonic() + self.limits.timeout
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
            if conn.head_complete():  # a pipelined request is already here
                self._dispatch(conn)

    def _expire(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self._open if c.state != "busy" and c.deadline <= now]:
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        if conn.state != "busy":
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)
        conn.sock.close()
        self._open.discard(conn)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _stop_all(self) -> None:
        """Close every connection; the ones workers hold are shut first so blocked reads return at once."""
        for conn in list(self._open):
            if conn.state == "busy":
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
            else:
                self._close(conn)
        self._pool.shutdown(wait=True, cancel_futures=True)
        for conn in list(self._open):
            conn.sock.close()
        self._open.clear()

    # -- workers ------------------------------------------------------------------------------------------
    def _work(self, conn: _Connection) -> None:
        keep = False
        try:
            conn.deadline = time.monotonic() + self.limits.timeout  # for the body: the head is here already
            handler = ScoringHandler(conn, conn.address, self)
            keep = not handler.close_connection and not self._stopping.is_set()
        except OSError:
            pass  # the client went away
        except Exception:
            self._log.exception("request.crashed", client=conn.address[0])
        finally:
            self._slots.release()
            self._handbacks.put((conn, keep))
            self._wake()


class ScoringHandler(BaseHTTPRequestHandler):
    """``/health``, ``/ping`` and ``/invocations`` for one request; one structured log line per request.

    Every answer is JSON; input the server cannot use is a 4xx with a short message, and only a bug (in the
    server or the model) is a 500, with a generic message and the traceback in the server's log.
    """

    server: ModelServer  # type: ignore[assignment]
    request: _Connection
    protocol_version = "HTTP/1.1"
    server_version = "flops-serve/1"

    def setup(self) -> None:
        self.connection = self.request
        self.rfile = self.request  # type: ignore[assignment]
        self.wfile = self.request  # type: ignore[assignment]
        self.started = time.monotonic()
        self.responded = False

    def handle(self) -> None:
        """One request; the server's event loop waits for the next one on a kept-alive connection."""
        self.handle_one_request()

    def finish(self) -> None:
        """The connection stays open: the server decides whether to keep or close it."""

    def log_message(self, format: str, *args: Any) -> None:
        """Silence http.server's own stderr lines; ``_send`` logs each request once."""

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's answers to malformed requests (bad request line, too many headers), as JSON."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # the request line was not understood: answer with headers
            self.request_version = "HTTP/1.1"
        status = HTTPStatus(code)
        self._error(status, message or status.phrase)

    def _send(
        self, status: HTTPStatus, payload: dict[str, Any], headers: dict[str, str] | None = None, **facts: Any
    ) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        self.responded = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        log = structlog.get_logger(__name__).bind(
            method=self.command, path=_clip(getattr(self, "path", "")), client=self.client_address[0]
        )
        duration_ms = round((time.monotonic() - self.started) * 1000, 2)
        level = "info" if status < HTTPStatus.BAD_REQUEST else "warning"
        getattr(log, level)("request.handled", status=int(status), duration_ms=duration_ms, **facts)

    def _error(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> None:
        message = _clip(message)
        self._send(status, {"error_code": status.name, "message": message}, headers, error=message)

    def _route(self) -> str:
        return self.path.split("?", 1)[0]

    def _authorized(self) -> bool:
        """True when no token is configured, for the open health endpoints, or with the right bearer token."""
        token = self.server.token
        if token is None or self._route() in OPEN_PATHS:
            return True
        scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("latin-1", "replace"), token.encode()
        ):
            return True
        self.close_connection = True  # a body, if any, is left unread
        self._error(HTTPStatus.UNAUTHORIZED, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})
        return False

    def _guarded(self, answer: Callable[[], None]) -> None:
        try:
            if self._authorized():
                answer()
        except OSError:
            raise  # the client went away: nothing to answer
        except Exception:
            structlog.get_logger(__name__).exception("request.crashed", method=self.command, path=_clip(self.path))
            self.close_connection = True
            if not self.responded:
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal server error; see the server log")

    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _get(self) -> None:
        if self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # a GET body is never read
        if self._route() in OPEN_PATHS:
            self._send(HTTPStatus.OK, {"status": "ok"})
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {self.path}")

    def _post(self) -> None:
        if self._route() != "/invocations":
            self.close_connection = True  # the body is left unread
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {self.path}")
            return
        body = self._read_body()
        if body is None:
            return
        try:
            predictions, rows = score(self.server.loaded.model, body, self.headers.get("Content-Type"))
        except BadInput as exc:
            self._error(exc.status, str(exc))
            return
        except Exception:  # a model bug must cost one request, never the server
            structlog.get_logger(__name__).exception("predict.crashed")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "prediction failed; see the server log")
            return
        self._send(HTTPStatus.OK, {"predictions": predictions}, rows=rows)

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering 411 / 413 / 400 / 408 (the connection is then closed)."""
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
            return None
        if not (raw_length.isascii() and raw_length.isdigit()):
            self.close_connection = True
            self._error(HTTPStatus.BAD_REQUEST, f"invalid Content-Length {raw_length!r}")
            return None
        length = int(raw_length) if len(raw_length) <= MAX_LENGTH_DIGITS else self.server.max_body_bytes + 1
        if length > self.server.max_body_bytes:
            self.close_connection = True  # never read an oversized body
            self._error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body of {raw_length} bytes exceeds the limit of {self.server.max_body_bytes} bytes",
            )
            return None
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_TIMEOUT, "the body did not arrive within the socket timeout")
            return None
        if len(body) < length:
            self.close_connection = True  # the client closed before sending it all
            return None
        return body


# -- client -----------------------------------------------------------------------------------------------
def predict(url: str, rows: Any, timeout: float = 10.0, token: str | None = None) -> list[Any]:
    """POST ``rows`` (nested lists or a numpy array) to the server at ``url``; return its predictions."""
    rows = rows.tolist() if isinstance(rows, np.ndarray) else rows
    body = json.dumps({"inputs": rows}).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url.rstrip("/") + "/invocations", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return list(json.loads(response.read())["predictions"])
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("message", exc.reason)
        except (ValueError, AttributeError):
            message = exc.reason
        raise PredictError(f"{url}: HTTP {exc.code}: {message}", exc.code) from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise PredictError(f"{url}: unreachable: {exc}", 0) from exc


def serve_command(package: Path, *, host: str = "127.0.0.1", port: int = 0, report_fd: int | None = None) -> list[str]:
    """The argv an agent runs to serve ``package``: the built env's interpreter and the manifest's entry module."""
    manifest = read_manifest(package)
    argv = [
        str(manifest.get("python") or sys.executable),
        "-m",
        str(manifest.get("entry_module") or __name__),
        "--package",
        str(package.resolve()),
        "--host",
        host,
        "--port",
        str(port),
    ]
    return [*argv, "--report-fd", str(report_fd)] if report_fd is not None else argv


# -- process ----------------------------------------------------------------------------------------------
def advertised_url(host: str, port: int, advertise_host: str | None) -> str:
    """The URL clients use: a wildcard bind is not connectable, so it is advertised as loopback."""
    name = advertise_host or ("127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host)
    return f"http://[{name}]:{port}/" if ":" in name else f"http://{name}:{port}/"


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def parse_args(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """The command line; ``environ`` (``os.environ`` when None) supplies ``FLOPS_MODEL_TOKEN``."""
    p = argparse.ArgumentParser(prog="python -m flops.runtime.serve", description=__doc__.split("\n")[0])
    p.add_argument("--package", type=Path, required=True, help="model package directory (manifest.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=0, help="port to bind (0: a free port)")
    p.add_argument("--advertise-host", default=None, help="host name put in the model.served URL")
    p.add_argument("--max-body-bytes", type=_positive(int), default=DEFAULT_MAX_BODY_BYTES, help="largest request body")
    p.add_argument("--token-file", type=Path, default=None, help=f"bearer token clients must send (or ${TOKEN_ENV})")
    p.add_argument("--workers", type=_positive(int), default=DEFAULT_WORKERS, help="requests answered at once")
    p.add_argument("--queue", type=_positive(int), default=DEFAULT_QUEUE, help="requests waiting; more get 503")
    p.add_argument("--max-connections", type=_positive(int), default=DEFAULT_MAX_CONNECTIONS, help="open connections")
    p.add_argument("--timeout", type=_positive(float), default=DEFAULT_TIMEOUT_S, help="socket timeout, seconds")
    p.add_argument("--report-fd", type=int, default=None, help="file descriptor for report lines (default stdout)")
    args = p.parse_args(argv)
    args.env_token = (os.environ if environ is None else environ).get(TOKEN_ENV) or None
    return args


def load_token(token_file: Path | None, env_token: str | None) -> str | None:
    """The bearer token: the file's first line when a file is given, else the environment's, else None."""
    if token_file is None:
        return env_token
    try:
        lines = token_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read token file {token_file}: {exc}") from exc
    token = lines[0].strip() if lines else ""
    if not token:
        raise ModelLoadError(f"token file {token_file} is empty")
    return token


def run(args: argparse.Namespace, reports: ReportWriter) -> int:
    log = structlog.get_logger(__name__).bind(package=str(args.package))
    stopping = threading.Event()
    servers: list[ModelServer] = []

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("serve.stopping", signal=signal.Signals(signum).name)
        stopping.set()
        for server in servers:
            server.shutdown()

    # Installed before loading, so a stop during a slow import is a clean exit too.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        token = load_token(args.token_file, args.env_token)
        loaded = load_model(args.package)
    except ModelLoadError as exc:
        log.error("model.failed", reason=exc.reason, tail=exc.tail)
        reports.emit(MODEL_FAILED, reason=exc.reason, log_tail=exc.tail)
        return 1
    limits = Limits(
        workers=args.workers,
        queue=args.queue,
        max_connections=args.max_connections,
        timeout=args.timeout,
        max_body_bytes=args.max_body_bytes,
    )
    try:
        server = ModelServer((args.host, args.port), loaded, limits=limits, token=token)
    except OSError as exc:
        reason = f"cannot listen on {args.host}:{args.port}: {exc}"
        log.error("model.failed", reason=reason)
        reports.emit(MODEL_FAILED, reason=reason, log_tail="")
        return 1
    servers.append(server)
    url = advertised_url(args.host, server.server_address[1], args.advertise_host)
    with server:
        if stopping.is_set():
            log.info("serve.stopped", served=False)
            return 0
        log.info(
            "model.served",
            url=url,
            model_file=str(loaded.model_file),
            model=type(loaded.model).__name__,
            token=token is not None,
            workers=limits.workers,
        )
        reports.emit(MODEL_SERVED, url=url)
        server.serve_forever()
    log.info("serve.stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    from flops.logs import configure

    configure()
    args = parse_args(argv)
    return run(args, ReportWriter.open(args.report_fd))


if __name__ == "__main__":
    sys.exit(main())
