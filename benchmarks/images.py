"""Images: build, cache hit, push, pull and container start times, and ``flops demo --images`` against the plain
(environment) demo in the same run.

``python benchmarks/images.py [--quick] [--cold-base]``

1. A loopback registry (Debian's docker-registry) and a fresh commit of the example repo.
2. Cold build of its base, learner and aggregator images with the Debian root and the runtime image cached
   (as after the first build on a machine); with ``--cold-base`` the local Debian and runtime images are
   removed first, so the build also makes them (debootstrap's tarball stays cached).
3. Warm build: the same spec again, a registry cache hit.
4. Push (``buildah push`` of the learner image to a new name) and pull (``podman pull`` into an empty
   storage), and the start of a container (``podman run … python -c pass``, median of 3).
5. The plain demo and ``flops demo --images`` (both post-training steps, the trained-model image built and
   served), each in a fresh work directory; environments and the Debian/runtime images cached, the repo's
   images built (the demo commits the example repo afresh). Target: images at most 2x the plain demo.
``--quick`` skips step 5.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import quiet_logs, record, table

from flops.builder.image_backend import ImageBuilder, ImageBuilderSettings
from flops.containers import Podman, PodmanSettings
from flops.demo import example_repo, run_demo
from flops.ports import free_port
from flops.registry import start_registry
from flops.settings import Settings


def note(results: dict[str, object], key: str, value: object) -> None:
    """Keep a figure and show it at once (a long run that fails later still says what it measured)."""
    results[key] = value
    print(f"{key}: {value}", flush=True)


def timed(argv: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, timeout=1800)
    return time.monotonic() - started


def demo(work: Path, images: bool) -> dict[str, object]:
    console = Console(file=open("/dev/null", "w"))  # noqa: SIM115 - the demo's screen is not the point here
    started = time.monotonic()
    result = run_demo(Settings(data_dir=work / "data"), work / "demo", console, images=images, timeout=1800)
    right = sum(p == y for p, y in zip(result.predictions, result.labels, strict=True))
    return {
        "total_s": round(time.monotonic() - started, 1),
        "stages_s": {k: round(v, 1) for k, v in result.stage_seconds.items()},
        "outcome": result.state.outcome.value if result.state.outcome else "?",
        "held_out_accuracy": round(right / max(1, len(result.labels)), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cold-base", action="store_true")
    args = parser.parse_args()
    quiet_logs("warning")
    work = Path(tempfile.mkdtemp(prefix="flops-images-bench-"))
    registry = start_registry(work / "registry", port=free_port())
    results: dict[str, object] = {}
    try:
        settings = ImageBuilderSettings(registry=registry.address)
        builder = ImageBuilder(settings)
        if args.cold_base:
            for name in ("localhost/flops/debian:bookworm-linux-amd64",):
                subprocess.run(
                    ["buildah", "--storage-driver", settings.storage_driver, "rmi", "--force", name],
                    capture_output=True,
                )
        spec = {"repo_url": example_repo(work / "repo"), "flavor": "sklearn", "platforms": ["linux/amd64"]}
        started = time.monotonic()
        cold = builder.build(spec, work / "builds")
        note(results, "cold_build_s", round(time.monotonic() - started, 1))
        assert cold.kind == "build.succeeded", cold
        started = time.monotonic()
        warm = builder.build(spec, work / "builds")
        note(results, "warm_build_s", round(time.monotonic() - started, 2))
        assert warm.kind == "build.succeeded" and warm.cached, warm
        learner = cold.artifact.images["learner"]  # type: ignore[union-attr]
        podman = Podman(PodmanSettings(root=work / "podman"), "bench")
        pull = [*podman.global_args(), "pull", "--tls-verify=false", learner]
        note(results, "pull_s", round(timed(pull), 1))
        copy = f"{registry.address}/bench/learner:copy"
        push = [*podman.global_args(), "push", "--tls-verify=false", learner, f"docker://{copy}"]
        note(results, "push_s", round(timed(push), 1))
        run = [*podman.global_args(), "run", "--rm", "--network", "host", "--entrypoint", "python"]
        run += ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096", learner, "-c", "pass"]
        note(results, "container_start_s", round(statistics.median(timed(run) for _ in range(3)), 1))
        size = subprocess.run(
            [*podman.global_args(), "image", "inspect", "--format", "{{.Size}}", learner],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        note(results, "learner_image_mb", round(int(size) / 1e6))
        if not args.quick:
            note(results, "demo_env", demo(work / "env", images=False))
            note(results, "demo_images", demo(work / "images", images=True))
            env_s = results["demo_env"]["total_s"]  # type: ignore[index]
            img_s = results["demo_images"]["total_s"]  # type: ignore[index]
            note(results, "demo_ratio", round(img_s / env_s, 2))
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    rows = [[k, v if not isinstance(v, dict) else v.get("total_s")] for k, v in results.items()]
    table(rows, ["measure", "value (s, MB, ratio)"])
    record("images", args.quick, results)


if __name__ == "__main__":
    main()
