"""A long-lived ClientApp executor for a SuperNode started with ``--isolation process``.

``python -m flops.runtime.clientapp_worker --runtime-api-address HOST:PORT [--poll S]``

With Flower's default ``subprocess`` isolation every train/evaluate message spawns a fresh
``flwr-clientapp`` process (interpreter start, Flower + ML imports, FAB install, repository
import and data load): about 4-5 s per message here. This worker does what Flower's SuperExec +
``flwr-clientapp`` pair does, but in one warm process: it acquires ClientApp tasks from the
SuperNode's Runtime API, runs ``flops.runtime.clientapp.app`` in-process (the repository's
ModelManager and data stay loaded between messages) and pushes the reply and task status back
through the same Runtime API calls ``flwr-clientapp`` uses.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import structlog
from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from flops.runtime.clientapp import app
from flops.runtime.repo import traceback_tail


def _client(address: str, *interceptors: object) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=list(interceptors),
        retry_invoker=make_simple_http_retry_invoker(),
    )


def run_task(address: str, token: str) -> None:
    """Run one acquired ClientApp task in this process and report its outcome to the SuperNode."""
    log = structlog.get_logger(__name__)
    client = _client(
        address,
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
        RuntimeTokenHttpInterceptor(token),
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message: Message | None = None
    context: Context | None = None
    reply: Message | None = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, _run, _fab = pull_task_input(client)
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:
        details = f"{type(exc).__name__}: {exc}\n{traceback_tail(exc)}"
        log.error("clientapp.failed", reason=details)
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            # Before the task output, which ends the task and its token: a heartbeat sent after that is
            # refused (401), and Flower's retry code answers a 401 by sending this process SIGINT.
            if heartbeat.is_running:
                heartbeat.stop()
            try:
                push_task_output(client=client, context=context, sub_status=status, details=details)
            finally:
                client.close()


def serve(address: str, poll: float) -> None:
    """Acquire and run ClientApp tasks forever."""
    acquirer = _client(address, RuntimeVersionHttpInterceptor(component_name="SuperExec"))
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    try:
        while True:
            res = acquirer.AcquireTask(request)
            if res.HasField("task") and res.token:
                run_task(address, res.token)
                continue
            time.sleep(poll)
    finally:
        acquirer.close()


def ignore_sigint() -> None:
    """Keep serving through SIGINT. Only Flower's own retry code sends it here (we lead our own process group
    and are stopped with SIGTERM): on a 401 it assumes a one-task ``flwr-clientapp`` whose run is over. For a
    worker serving every task that is one finished task, not a reason to stop."""
    log = structlog.get_logger(__name__)
    signal.signal(signal.SIGINT, lambda signum, frame: log.warning("clientapp.sigint_ignored"))


def main(argv: list[str] | None = None) -> None:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    ignore_sigint()
    p = argparse.ArgumentParser(prog="python -m flops.runtime.clientapp_worker", description=__doc__.split("\n")[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT")
    p.add_argument("--poll", type=float, default=0.05, help="seconds between task polls when idle")
    args = p.parse_args(argv)
    serve(args.runtime_api_address, args.poll)


if __name__ == "__main__":
    main()
