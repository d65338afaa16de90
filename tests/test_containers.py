"""The podman command lines an agent runs (no podman needed) and the report pipe handed in as descriptor 3."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from flops.containers import LABEL_AGENT, LABEL_PROJECT, REPORT_FD, Podman, PodmanSettings, container_name, runroot
from flops.supervisor import OWNER_PID_ENV, at_descriptor


def test_a_child_container_is_removed_on_exit_labelled_and_sees_secrets_only_by_name(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    ca = tmp_path / "ca.crt"
    ca.write_text("ca")
    argv = Podman(PodmanSettings(), "node-1").run_argv(
        name="flops-p-1.2.run_learner.ab",
        image="127.0.0.1:5000/o/r/learner:c",
        args=["-m", "flops.runtime.learner", "--repo", "/opt/flops/repo"],
        project_id="p-1",
        command_id="p-1.2.run_learner.ab",
        env_names=["FLOPS_DATA_TOKEN"],
        mounts=[work, ca],
        entrypoint="python",
    )
    joined = " ".join(argv)
    assert argv[argv.index("run") + 1 :][:2] == ["--rm", "--name"]
    assert f"--label {LABEL_AGENT}=node-1" in joined and f"--label {LABEL_PROJECT}=p-1" in joined
    assert "--env FLOPS_DATA_TOKEN" in joined and f"--env {OWNER_PID_ENV}" in joined
    assert "secret" not in joined  # values never appear: podman takes them from its own environment
    assert f"--volume {work}:{work}:rw" in joined and f"--volume {ca}:{ca}:ro" in joined
    assert "--preserve-fds 1" in joined and "--network host" in joined and "--pid host" in joined
    assert argv[-5:] == ["127.0.0.1:5000/o/r/learner:c", "-m", "flops.runtime.learner", "--repo", "/opt/flops/repo"]


def test_an_own_image_storage_gets_a_short_run_directory(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 80) / "containers"
    args = Podman(PodmanSettings(root=deep), "node-1").global_args()
    assert args[args.index("--root") + 1] == str(deep / "storage")
    assert len(args[args.index("--runroot") + 1]) < 50  # podman refuses longer ones
    assert runroot(deep) == runroot(deep) != runroot(tmp_path)


def test_container_names_are_safe_and_one_per_command() -> None:
    assert container_name("p-1.2.run_learner.ab/../x y") == "flops-p-1.2.run_learner.ab-..-x-y"


def test_the_report_pipe_reaches_the_child_as_descriptor_3_and_it_knows_its_launcher() -> None:
    read_fd, write_fd = os.pipe()
    script = f"import os; os.write({REPORT_FD}, os.environ['{OWNER_PID_ENV}'].encode())"
    proc = subprocess.Popen(at_descriptor(["python3", "-c", script], write_fd, REPORT_FD), pass_fds=(write_fd,))
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        said = pipe.read()
    assert proc.wait(timeout=30) == 0
    assert said == str(proc.pid)  # bash exec'd the child: the launcher's pid is the child's own
