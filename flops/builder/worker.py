"""One build as a child process of the agent, so stopping the project or the agent stops the build.

``python -m flops.builder.worker --spec JSON --workdir DIR [--report-fd FD] [--backend env|image …]`` runs the
builder (``EnvBuilder``, or ``ImageBuilder`` whose buildah runs in this worker's process group)
and writes ``build.started``, then ``build.succeeded`` (the artifact as the agent reports it) or
``build.failed`` to ``--report-fd``. Killing its process group (SIGTERM, then SIGKILL) ends it at once, and
the installer it runs (``uv``, ``pip``, ``git``: their own sessions) dies with it (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import structlog

from flops.builder import Builder
from flops.runtime.reports import BUILD_FAILED, BUILD_STARTED, BUILD_SUCCEEDED, ReportWriter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flops.builder.worker", description=__doc__)
    p.add_argument("--spec", required=True, help="the build spec as JSON (repo_url, commit, flavor, platforms)")
    p.add_argument("--workdir", type=Path, required=True, help="the builder's directory (envs, repos, caches)")
    p.add_argument("--report-fd", type=int, default=None, help="file descriptor for report lines (default stdout)")
    p.add_argument("--backend", choices=("env", "image"), default="env", help="environment (default) or images")
    p.add_argument("--registry", default="127.0.0.1:5000", help="image backend: host:port of the FLOps registry")
    p.add_argument("--registry-tls", action="store_true", help="image backend: the registry speaks HTTPS")
    p.add_argument("--storage-driver", default="overlay", help="image backend: buildah's storage driver")
    p.add_argument("--base-image", default=None, help="image backend: base image (default: debootstrap'ed Debian)")
    return p.parse_args(argv)


def make_builder(args: argparse.Namespace) -> Builder:
    """The backend ``--backend`` names; the image backend streams buildah's lines into this worker's log."""
    if args.backend == "image":
        from flops.builder.image_backend import ImageBuilder, ImageBuilderSettings

        settings = ImageBuilderSettings(
            registry=args.registry,
            registry_tls=args.registry_tls,
            base_image=args.base_image,
            storage_driver=args.storage_driver,
        )
        log = structlog.get_logger("flops.builder.worker")
        return ImageBuilder(settings, on_line=lambda step, line: log.info(line, step=step))
    from flops.builder import EnvBuilder

    return EnvBuilder()


def artifact_report(payload: dict[str, Any]) -> dict[str, Any]:
    """A ``build.succeeded`` payload of the builder as the agent reports it: ``ref`` and ``details``."""
    artifact = payload["artifact"]
    ref = artifact["ref"] if artifact.get("kind") == "image" else f"env://{artifact['key']}"
    return {
        "artifact": {"ref": ref, "key": artifact["key"], "commit": artifact["commit"]} | {"details": artifact},
        "cached": payload["cached"],
        "warnings": payload["warnings"],
        "duration_s": payload["duration_s"],
    }


def run(args: argparse.Namespace, reports: ReportWriter) -> int:
    reports.emit(BUILD_STARTED)
    result = make_builder(args).build(json.loads(args.spec), args.workdir)
    payload = result.to_payload()
    if result.kind == "build.succeeded":
        reports.emit(BUILD_SUCCEEDED, **artifact_report(payload))
        return 0
    reports.emit(BUILD_FAILED, reason=payload["reason"], log_tail=payload["log_tail"][-4000:])
    return 1


def main(argv: list[str] | None = None) -> int:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    args = parse_args(argv)
    return run(args, ReportWriter.open(args.report_fd))


if __name__ == "__main__":
    sys.exit(main())
