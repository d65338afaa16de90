"""Inference server for a packaged model (post-training step ``deploy_trained_model_image``).

``python -m flops.runtime.serve --package DIR [--host 127.0.0.1] [--port 0] [--advertise-host H]
[--max-body-bytes N] [--report-fd FD]``

Reads the package's ``manifest.json`` (``flops.builder.model_package``), imports the repo's
``ModelManager`` from the package's code directory, sets the saved parameters (``model.npz``, the
aggregator's ``np.savez`` of the parameter list) and serves HTTP:

- ``GET /health`` (and MLflow's ``GET /ping``) → 200 ``{"status": "ok"}``;
- ``POST /invocations`` with an MLflow scoring body → 200 ``{"predictions": [...]}``. JSON bodies
  carry exactly one of ``inputs`` / ``instances`` (rows), ``dataframe_split`` (``columns`` + ``data``)
  or ``dataframe_records`` (list of objects); ``text/csv`` bodies are rows of values, with a header
  row when the first row is not all numbers. Rows of more than one dimension (8x8 images) are
  flattened, a single flat row is one sample. Bad input (malformed JSON or CSV, nesting too deep,
  numbers too large, wrong shapes) → 400 (MLflow-style ``{"error_code", "message"}``), oversized
  body → 413, unknown media type → 415; a model bug → 500 with a generic message, traceback in the log.

Once it listens it writes a ``model.served`` report ``{"url": "http://host:port/"}`` to
``--report-fd`` (stdout when absent); when the model cannot be loaded, ``model.failed``
``{reason, log_tail}`` and exit status 1. SIGTERM / SIGINT stop it cleanly with status 0.
``predict(url, rows)`` is the matching client.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, Final

import numpy as np
import structlog

from flops.builder.model_package import DEFAULT_MODEL_FILE, MANIFEST
from flops.runtime.repo import RepoLoadError, new_model_manager, traceback_tail
from flops.runtime.reports import MODEL_FAILED, MODEL_SERVED, ReportWriter

DEFAULT_MAX_BODY_BYTES: Final = 16 * 1024 * 1024
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
class ModelHTTPServer(ThreadingHTTPServer):
    """Serves one loaded model; request threads are daemons so a stuck client cannot block shutdown."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], loaded: LoadedModel, *, max_body_bytes: int) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.loaded = loaded
        self.max_body_bytes = max_body_bytes
        super().__init__(address, ScoringHandler)


class ScoringHandler(BaseHTTPRequestHandler):
    """``/health``, ``/ping`` and ``/invocations``; one structured log line per request."""

    server: ModelHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "flops-serve/1"
    timeout = 60.0  # seconds a connection may sit idle or trickle its request before it is dropped

    def log_message(self, format: str, *args: Any) -> None:
        """Silence http.server's own stderr lines; ``_send`` logs each request once."""

    def _send(self, status: HTTPStatus, payload: dict[str, Any], started: float, **facts: Any) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        log = structlog.get_logger(__name__).bind(method=self.command, path=self.path, client=self.client_address[0])
        duration_ms = round((time.monotonic() - started) * 1000, 2)
        level = "info" if status < HTTPStatus.BAD_REQUEST else "warning"
        getattr(log, level)("request.handled", status=int(status), duration_ms=duration_ms, **facts)

    def _error(self, status: HTTPStatus, message: str, started: float) -> None:
        self._send(status, {"error_code": status.name, "message": message}, started, error=message)

    def do_GET(self) -> None:
        started = time.monotonic()
        if self.path.split("?", 1)[0] in ("/health", "/ping"):
            self._send(HTTPStatus.OK, {"status": "ok"}, started)
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {self.path}", started)

    def do_POST(self) -> None:
        started = time.monotonic()
        if self.path.split("?", 1)[0] != "/invocations":
            self.close_connection = True  # the body is left unread
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {self.path}", started)
            return
        body = self._read_body(started)
        if body is None:
            return
        try:
            predictions, rows = score(self.server.loaded.model, body, self.headers.get("Content-Type"))
        except BadInput as exc:
            self._error(exc.status, str(exc), started)
            return
        except Exception:  # a model bug must cost one request, never the server
            structlog.get_logger(__name__).exception("predict.crashed")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "prediction failed; see the server log", started)
            return
        self._send(HTTPStatus.OK, {"predictions": predictions}, started, rows=rows)

    def _read_body(self, started: float) -> bytes | None:
        """The request body, or None after answering 411 / 413 / 400 (the connection is then closed)."""
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required", started)
            return None
        try:
            length = int(raw_length)
            if length < 0:
                raise ValueError(raw_length)
        except ValueError:
            self.close_connection = True
            self._error(HTTPStatus.BAD_REQUEST, f"invalid Content-Length {raw_length!r}", started)
            return None
        if length > self.server.max_body_bytes:
            self.close_connection = True  # never read an oversized body
            self._error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body of {length} bytes exceeds the limit of {self.server.max_body_bytes} bytes",
                started,
            )
            return None
        return self.rfile.read(length)


# -- client -----------------------------------------------------------------------------------------------
def predict(url: str, rows: Any, timeout: float = 10.0) -> list[Any]:
    """POST ``rows`` (nested lists or a numpy array) to the server at ``url``; return its predictions."""
    rows = rows.tolist() if isinstance(rows, np.ndarray) else rows
    body = json.dumps({"inputs": rows}).encode()
    request = urllib.request.Request(
        url.rstrip("/") + "/invocations", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flops.runtime.serve", description=__doc__.split("\n")[0])
    p.add_argument("--package", type=Path, required=True, help="model package directory (manifest.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=0, help="port to bind (0: a free port)")
    p.add_argument("--advertise-host", default=None, help="host name put in the model.served URL")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="largest request body")
    p.add_argument("--report-fd", type=int, default=None, help="file descriptor for report lines (default stdout)")
    return p.parse_args(argv)


def run(args: argparse.Namespace, reports: ReportWriter) -> int:
    log = structlog.get_logger(__name__).bind(package=str(args.package))
    stopping = threading.Event()
    servers: list[ModelHTTPServer] = []

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("serve.stopping", signal=signal.Signals(signum).name)
        stopping.set()
        for server in servers:
            # shutdown() waits for serve_forever() to return, so it must not run on serve_forever's thread.
            threading.Thread(target=server.shutdown, name="serve-shutdown", daemon=True).start()

    # Installed before loading, so a stop during a slow import is a clean exit too.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        loaded = load_model(args.package)
    except ModelLoadError as exc:
        log.error("model.failed", reason=exc.reason, tail=exc.tail)
        reports.emit(MODEL_FAILED, reason=exc.reason, log_tail=exc.tail)
        return 1
    try:
        server = ModelHTTPServer((args.host, args.port), loaded, max_body_bytes=args.max_body_bytes)
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
        log.info("model.served", url=url, model_file=str(loaded.model_file), model=type(loaded.model).__name__)
        reports.emit(MODEL_SERVED, url=url)
        server.serve_forever(poll_interval=0.2)
    log.info("serve.stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    from flops.logs import configure

    configure()
    args = parse_args(argv)
    return run(args, ReportWriter.open(args.report_fd))


if __name__ == "__main__":
    sys.exit(main())
