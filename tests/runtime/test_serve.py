"""The model server as a real process: a digits model trained through the example repo, packaged and served."""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from flops.builder import ArtifactRef, package_model
from flops.runtime.serve import MODEL_FAILED, MODEL_SERVED, PredictError, predict, serve_command
from tests.base_support import digits_features, train_example_model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ml_repos" / "digits_sklearn"
MAX_BODY = 200_000
START_TIMEOUT = 60.0


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    report: dict[str, Any]
    report_fd: int
    log: Path

    @property
    def url(self) -> str:
        return str(self.report["payload"]["url"])


def _read_report(fd: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = START_TIMEOUT) -> dict[str, Any]:
    """The first report line on `fd`, waiting at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    buffer = b""
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no report line within {timeout} s; server log:\n{log.read_text()}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"report fd closed (exit {proc.wait(5)}); server log:\n{log.read_text()}")
            buffer += chunk
    return json.loads(buffer.split(b"\n", 1)[0])


def _start(package: Path, tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> Server:
    read_fd, write_fd = os.pipe()
    log = tmp_path / f"serve-{time.monotonic_ns()}.log"
    argv = [*serve_command(package, host="127.0.0.1", port=0, report_fd=write_fd), *extra]
    environ = {k: v for k, v in os.environ.items() if k != "FLOPS_MODEL_TOKEN"} | (env or {})
    with log.open("wb") as log_file:
        proc = subprocess.Popen(argv, pass_fds=(write_fd,), stdout=log_file, stderr=subprocess.STDOUT, env=environ)
    os.close(write_fd)
    return Server(proc=proc, report=_read_report(read_fd, proc, log), report_fd=read_fd, log=log)


def _stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        server.proc.wait(timeout=10)
    os.close(server.report_fd)


def _ref(python: str = sys.executable) -> ArtifactRef:
    return ArtifactRef(
        key="test",
        python=python,
        repo_dir=str(EXAMPLE),
        repo_url="file:///example",
        commit="c" * 40,
        flavor="default",
        platforms=(),
        dependency_file="conda.yaml",
        requirements=("scikit-learn>=1.4",),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A packaged model (saved as the aggregator saves it) and the in-process model it was made from."""
    parameters, model = train_example_model()
    root = tmp_path_factory.mktemp("serve")
    model_out = root / "model-out"
    model_out.mkdir()
    np.savez(model_out / "model.npz", *parameters)
    (model_out / "metrics.json").write_text(json.dumps({"best_round": 1}))
    package = package_model(model_out, _ref(), EXAMPLE, root / "package")
    return package.path, model


@pytest.fixture(scope="module")
def server(trained: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = _start(trained[0], tmp_path_factory.mktemp("serve-run"), "--max-body-bytes", str(MAX_BODY))
    yield running
    _stop(running)


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    """Held-out rows (never trained on)."""
    return digits_features("test")[0][:25]


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url + "invocations", data=body, headers={"Content-Type": content_type}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _raw(url: str, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """A request with exactly these headers and no body (to test Content-Length handling)."""
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _expected(trained: tuple[Path, Any], x: np.ndarray) -> list[int]:
    return trained[1].predict(x).tolist()


def test_package_manifest_points_at_the_server(trained: tuple[Path, Any]) -> None:
    manifest = json.loads((trained[0] / "manifest.json").read_text())

    assert manifest["entry_module"] == "flops.runtime.serve"
    assert manifest["model_file"] == "model.npz"
    assert manifest["python"] == sys.executable
    assert (trained[0] / manifest["code_dir"] / "model_manager.py").is_file()


def test_reports_served_url_and_answers_health(server: Server) -> None:
    assert server.report["kind"] == MODEL_SERVED
    assert server.url.startswith("http://127.0.0.1:")

    with urllib.request.urlopen(server.url + "health", timeout=10) as response:
        assert response.status == 200
        assert json.loads(response.read()) == {"status": "ok"}


@pytest.mark.parametrize(
    "make_body",
    [
        pytest.param(lambda x: {"inputs": x.tolist()}, id="inputs"),
        pytest.param(lambda x: {"inputs": x.reshape(len(x), 8, 8).tolist()}, id="inputs-8x8"),
        pytest.param(lambda x: {"instances": x.tolist()}, id="instances"),
        pytest.param(
            lambda x: {"dataframe_split": {"columns": [f"p{i}" for i in range(64)], "data": x.tolist()}},
            id="dataframe_split",
        ),
        pytest.param(
            lambda x: {"dataframe_records": [{f"p{i}": v for i, v in enumerate(row)} for row in x.tolist()]},
            id="dataframe_records",
        ),
    ],
)
def test_json_formats_predict_like_the_model(
    server: Server, trained: tuple[Path, Any], rows: np.ndarray, make_body: Any
) -> None:
    x = rows

    status, reply = _post(server.url, json.dumps(make_body(x)).encode())

    assert status == 200, reply
    assert reply == {"predictions": _expected(trained, x)}


@pytest.mark.parametrize("header", [False, True], ids=["no-header", "header"])
def test_csv_predicts_like_the_model(server: Server, trained: tuple[Path, Any], rows: np.ndarray, header: bool) -> None:
    x = rows
    lines = [",".join(f"p{i}" for i in range(64))] if header else []
    lines += [",".join(repr(float(v)) for v in row) for row in x]

    status, reply = _post(server.url, ("\n".join(lines) + "\n").encode(), "text/csv; charset=utf-8")

    assert status == 200, reply
    assert reply == {"predictions": _expected(trained, x)}


def test_predict_helper(server: Server, trained: tuple[Path, Any], rows: np.ndarray) -> None:
    x = rows

    assert predict(server.url, x, timeout=10) == _expected(trained, x)
    assert predict(server.url, x[0].tolist(), timeout=10) == _expected(trained, x[:1])
    with pytest.raises(PredictError, match="64 features") as excinfo:
        predict(server.url, [[1.0, 2.0]], timeout=10)
    assert excinfo.value.status == 400


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (b"{not json", "application/json", 400, "not valid JSON"),
        (b'{"rows": [[1]]}', "application/json", 400, "exactly one of"),
        (b'{"inputs": [[1], [1]], "instances": [[1]]}', "application/json", 400, "exactly one of"),
        (b'{"inputs": []}', "application/json", 400, "no rows"),
        (b'{"inputs": {"x": [1]}}', "application/json", 400, "named tensors"),
        (b'{"inputs": [[1, 2], [3]]}', "application/json", 400, "same shape"),
        (b'{"inputs": [[1, 2, 3]]}', "application/json", 400, "64 features"),
        (json.dumps({"inputs": [["a"] * 64]}).encode(), "application/json", 400, "model rejected the input"),
        (b'{"dataframe_split": {"columns": ["a"]}}', "application/json", 400, "dataframe_split"),
        (b'{"dataframe_records": [{"a": 1}, {"b": 2}]}', "application/json", 400, "has keys"),
        (b"a,b\n", "text/csv", 400, "no rows"),
        (b"1,2\n3\n", "text/csv", 400, "same shape"),
        (b"\xff\xfe", "text/csv", 400, "not UTF-8"),
        (b"<x/>", "application/xml", 415, "unsupported content type"),
    ],
)
def test_bad_input_is_400_with_a_message_and_the_server_keeps_serving(
    server: Server, body: bytes, content_type: str, status: int, message: str
) -> None:
    got_status, reply = _post(server.url, body, content_type)

    assert got_status == status
    assert message in reply["message"]
    assert predict(server.url, [[0.0] * 64], timeout=10)


def test_body_size_and_length_limits(server: Server) -> None:
    too_big = {"Content-Type": "application/json", "Content-Length": str(MAX_BODY + 1)}

    assert _raw(server.url, "POST", "/invocations", too_big)[0] == 413
    assert _raw(server.url, "POST", "/invocations", {"Content-Type": "application/json"})[0] == 411
    assert _raw(server.url, "GET", "/nowhere", {})[0] == 404
    assert _raw(server.url, "GET", "/ping", {}) == (200, {"status": "ok"})


def test_sigterm_stops_the_server_cleanly(trained: tuple[Path, Any], tmp_path: Path) -> None:
    running = _start(trained[0], tmp_path)
    try:
        assert predict(running.url, [[0.0] * 64], timeout=10)

        running.proc.send_signal(signal.SIGTERM)

        assert running.proc.wait(timeout=10) == 0
    finally:
        _stop(running)
    with pytest.raises(PredictError) as excinfo:
        predict(running.url, [[0.0] * 64], timeout=5)
    assert excinfo.value.status == 0


def test_unloadable_package_reports_model_failed(trained: tuple[Path, Any], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.npz").write_bytes(b"not an npz")
    package_model(model, _ref(), EXAMPLE, broken)

    failed = _start(broken, tmp_path)
    try:
        assert failed.report["kind"] == MODEL_FAILED
        assert "model.npz" in failed.report["payload"]["reason"]
        assert failed.proc.wait(timeout=10) == 1
    finally:
        _stop(failed)


# -- trust: tokens, bounded workers, hostile input ---------------------------------------------------------
TOKEN = "s3cret-token"


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    return host, int(port)


def _exchange(url: str, data: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send raw bytes, read until the server closes; (status, body) of the answer, (0, b"") for none."""
    with socket.create_connection(_address(url), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    if not answer:
        return 0, b""
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _post_with(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:
    request = urllib.request.Request(url + "invocations", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def _assert_short_json_error(reply: dict[str, Any]) -> None:
    assert set(reply) == {"error_code", "message"}
    assert "Traceback" not in reply["message"] and len(reply["message"]) <= 300


@pytest.fixture(scope="module")
def guarded(trained: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("serve-guarded")
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    running = _start(trained[0], root, "--token-file", str(token_file))
    yield running
    _stop(running)


def test_token_is_required_except_for_ping_and_health(guarded: Server, rows: np.ndarray) -> None:
    body = json.dumps({"inputs": rows.tolist()}).encode()
    json_type = {"Content-Type": "application/json"}

    for headers in (json_type, json_type | {"Authorization": "Bearer wrong"}, json_type | {"Authorization": TOKEN}):
        status, reply, answer_headers = _post_with(guarded.url, body, headers)
        assert status == 401, reply
        _assert_short_json_error(reply)
        assert answer_headers["WWW-Authenticate"].startswith("Bearer")
    assert _raw(guarded.url, "GET", "/nowhere", {})[0] == 401
    for path in ("/ping", "/health"):
        assert _raw(guarded.url, "GET", path, {}) == (200, {"status": "ok"})


def test_the_right_token_is_accepted(guarded: Server, trained: tuple[Path, Any], rows: np.ndarray) -> None:
    status, reply, _ = _post_with(
        guarded.url,
        json.dumps({"inputs": rows.tolist()}).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )

    assert (status, reply) == (200, {"predictions": _expected(trained, rows)})
    assert predict(guarded.url, rows, timeout=10, token=TOKEN) == _expected(trained, rows)
    with pytest.raises(PredictError) as excinfo:
        predict(guarded.url, rows, timeout=10)
    assert excinfo.value.status == 401


def test_the_token_can_come_from_the_environment(trained: tuple[Path, Any], tmp_path: Path) -> None:
    running = _start(trained[0], tmp_path, env={"FLOPS_MODEL_TOKEN": TOKEN})
    try:
        with pytest.raises(PredictError) as excinfo:
            predict(running.url, [[0.0] * 64], timeout=10)
        assert excinfo.value.status == 401
        assert predict(running.url, [[0.0] * 64], timeout=10, token=TOKEN)
    finally:
        _stop(running)


def test_slow_clients_neither_starve_requests_nor_multiply_threads(server: Server, rows: np.ndarray) -> None:
    """100 connections that send nothing (and 20 that stop mid-header) cost no worker and no thread."""
    address = _address(server.url)
    idle = [socket.create_connection(address, timeout=10) for _ in range(100)]
    trickling = [socket.create_connection(address, timeout=10) for _ in range(20)]
    try:
        for sock in trickling:
            sock.sendall(b"POST /invocations HTTP/1.1\r\nContent-Type: appl")
        time.sleep(0.5)

        started = time.monotonic()
        assert predict(server.url, rows[:1], timeout=10)
        assert time.monotonic() - started < 5.0  # well below the socket timeout
        assert psutil.Process(server.proc.pid).num_threads() <= 12
    finally:
        for sock in idle + trickling:
            sock.close()


@pytest.fixture(scope="module")
def cramped(trained: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One worker, one queue slot and a 2 s socket timeout."""
    running = _start(
        trained[0], tmp_path_factory.mktemp("serve-cramped"), "--workers", "1", "--queue", "1", "--timeout", "2"
    )
    yield running
    _stop(running)


def test_a_client_that_stalls_is_dropped_after_the_socket_timeout(cramped: Server) -> None:
    address = _address(cramped.url)
    head = b"POST /invocations HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    stalls = {"silent": b"", "mid-header": b"POST /invocations HTTP/1.1\r\nHost: x", "mid-body": head + b'{"inp'}
    for what, data in stalls.items():
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(data)
            started = time.monotonic()
            answer = sock.recv(65536)
            while chunk := sock.recv(65536):
                answer += chunk
            assert 1.5 < time.monotonic() - started < 5.0, what
            assert answer in (b"",) or answer.startswith(b"HTTP/1.1 408"), (what, answer)


def test_a_full_queue_is_answered_503_at_once(cramped: Server) -> None:
    address = _address(cramped.url)
    head = b"POST /invocations HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    busy = [socket.create_connection(address, timeout=10) for _ in range(2)]  # the worker, the queue slot
    try:
        for sock in busy:
            sock.sendall(head)
        time.sleep(0.5)

        started = time.monotonic()
        with pytest.raises(PredictError) as excinfo:
            predict(cramped.url, [[0.0] * 64], timeout=10)
        assert excinfo.value.status == 503
        assert time.monotonic() - started < 1.0
    finally:
        for sock in busy:
            sock.close()
    deadline = time.monotonic() + 10
    while True:  # the stalled requests time out and free their slots
        try:
            assert predict(cramped.url, [[0.0] * 64], timeout=10)
            break
        except PredictError as exc:
            if exc.status != 503 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _huge(value: int) -> bytes:
    return json.dumps({"inputs": [[0] * 63 + [0]]}).replace("0]]", f"{value}]]").encode()


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        pytest.param(b'{"inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "application/json", "nested", id="deep"),
        pytest.param(b'{"inputs": [[' + b"7" * 5000 + b"]]}", "application/json", "not valid JSON", id="digits"),
        pytest.param(_huge(10**400), "application/json", "too large", id="int-overflow"),
        pytest.param(_huge(-(10**400)), "application/json", "too large", id="negative-overflow"),
        pytest.param(b'{"inputs": [["\xff\xfe"]]}', "application/json", "not valid JSON", id="json-not-utf8"),
        pytest.param(b"1,2\n\xc3\x28\n", "text/csv", "not UTF-8", id="csv-not-utf8"),
        pytest.param(b'{"inputs": [[[1, 2], [3]]]}', "application/json", "same shape", id="ragged"),
        pytest.param(b'{"inputs": [[{"a": 1}]]}', "application/json", "plain values", id="objects"),
        pytest.param(b'{"inputs": [[1, 2, 3]]}', "application/json", "64 features", id="narrow"),
        pytest.param(b'{"inputs": ' + b"[" * 80 + b"1" + b"]" * 80 + b"}", "application/json", "shape", id="ndim"),
        pytest.param(b'"a' + b"x" * 200_000 + b"\n", "text/csv", "CSV", id="csv-field"),
    ],
)
def test_malformed_input_is_400_never_500(server: Server, body: bytes, content_type: str, message: str) -> None:
    status, reply = _post(server.url, body[:MAX_BODY], content_type)

    assert status == 400, reply
    _assert_short_json_error(reply)
    assert message in reply["message"]


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"GARBAGE\r\n\r\n", id="request-line"),
        pytest.param(b"GET /ping HTTP/1.x\r\n\r\n", id="version"),
        pytest.param(b"GET /ping HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", id="headers"),
        pytest.param(
            b"POST /invocations HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", id="content-length"
        ),
    ],
)
def test_malformed_requests_get_a_json_error(server: Server, request_bytes: bytes) -> None:
    status, body = _exchange(server.url, request_bytes)

    assert 400 <= status < 500
    _assert_short_json_error(json.loads(body))


def test_an_oversize_body_sent_in_full_is_answered_413(server: Server) -> None:
    """The client sends the whole body before reading; it must see the 413, not a reset connection."""
    body = json.dumps({"inputs": [[0.5] * 64] * 20_000}).encode()  # megabytes: more than socket buffers hold
    assert len(body) > 20 * MAX_BODY
    head = f"POST /invocations HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"

    status, answer = _exchange(server.url, head.encode() + body)

    assert status == 413
    _assert_short_json_error(json.loads(answer))
