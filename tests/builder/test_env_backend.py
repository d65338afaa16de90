"""End-to-end builds of throwaway ML repos with the uv-backed env builder."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from flops.builder import BuildFailure, BuildResult, EnvBuilder
from tests.builder.conftest import GitRepo


def run_in_env(python: str, code: str, cwd: str) -> str:
    return subprocess.run(
        [python, "-c", code], cwd=cwd, check=True, capture_output=True, text=True, timeout=120
    ).stdout.strip()


def test_conda_repo_builds_with_warnings_then_is_cached(
    make_repo: GitRepo, example_files: dict[str, str | None], env_builder: EnvBuilder, build_workdir: Path
) -> None:
    repo, sha = make_repo(example_files)
    spec = {"repo_url": str(repo), "commit": None, "flavor": "default", "platforms": ["linux/amd64"]}

    first = env_builder.build(spec, build_workdir)

    assert isinstance(first, BuildResult), first
    assert not first.cached
    assert first.artifact.commit == sha
    assert first.artifact.dependency_file == "conda.yaml"
    assert first.artifact.requirements == ("scikit-learn",)
    assert any("python=3.8" in w for w in first.warnings)
    assert any("'pip'" in w for w in first.warnings)
    # The env runs the repo's model and reaches the shared runtime (flwr) through the base.
    out = run_in_env(
        first.artifact.python,
        "import flwr, model_manager; print(len(model_manager.ModelManager().get_model_parameters()))",
        first.artifact.repo_dir,
    )
    assert out == "2"
    payload = first.to_payload()
    assert set(payload) == {"artifact", "cached", "warnings", "duration_s"}
    assert payload["artifact"]["key"] == first.artifact.key

    second = env_builder.build(spec, build_workdir)

    assert isinstance(second, BuildResult)
    assert second.cached
    assert second.artifact == first.artifact
    assert second.warnings == first.warnings
    assert second.duration_s < 1.0


def test_missing_model_manager_fails_naming_it(
    make_repo: GitRepo, example_files: dict[str, str | None], env_builder: EnvBuilder, build_workdir: Path
) -> None:
    repo, _ = make_repo({**example_files, "model_manager.py": None, "README.md": "no model\n"})

    result = env_builder.build({"repo_url": str(repo)}, build_workdir)

    assert isinstance(result, BuildFailure)
    assert result.step == "contract"
    assert "model_manager.py" in result.reason
    assert result.to_payload()["reason"] == result.reason


def test_import_error_fails_with_traceback_tail(
    make_repo: GitRepo, example_files: dict[str, str | None], env_builder: EnvBuilder, build_workdir: Path
) -> None:
    broken = "import a_module_that_does_not_exist_xyz\n" + str(example_files["model_manager.py"])
    repo, _ = make_repo({**example_files, "model_manager.py": broken})

    result = env_builder.build({"repo_url": str(repo)}, build_workdir)

    assert isinstance(result, BuildFailure)
    assert result.step == "import_check"
    assert "ModuleNotFoundError" in result.reason
    assert "a_module_that_does_not_exist_xyz" in result.reason
    assert "Traceback" in result.log_tail


def test_parameters_that_are_not_arrays_fail(
    make_repo: GitRepo, example_files: dict[str, str | None], env_builder: EnvBuilder, build_workdir: Path
) -> None:
    wrong = str(example_files["model_manager.py"]).replace(
        "return [self.model.coef_, self.model.intercept_]", "return {'coef': self.model.coef_}"
    )
    repo, _ = make_repo({**example_files, "model_manager.py": wrong})

    result = env_builder.build({"repo_url": str(repo)}, build_workdir)

    assert isinstance(result, BuildFailure)
    assert "expected a list of numpy arrays" in result.reason


def test_unresolvable_dependency_fails_naming_it(
    make_repo: GitRepo, example_files: dict[str, str | None], env_builder: EnvBuilder, build_workdir: Path
) -> None:
    repo, _ = make_repo(
        {**example_files, "conda.yaml": None, "requirements.txt": "definitely-not-a-package-xyz==9.9\n"}
    )

    result = env_builder.build({"repo_url": str(repo)}, build_workdir)

    assert isinstance(result, BuildFailure), result
    assert result.step == "install"
    assert "definitely-not-a-package-xyz" in result.reason
    assert result.log_tail


def test_requirements_txt_installs_only_what_the_base_lacks(
    make_repo: GitRepo, example_files: dict[str, str | None], env_builder: EnvBuilder, build_workdir: Path
) -> None:
    # scikit-learn is in the base (skipped); termcolor is not (installed); tomli-w is in the base at
    # another version (installed into the project env, shadowing the base's).
    requirements = "scikit-learn>=1.0  # from the base\ntermcolor==2.4.0\ntomli-w==1.0.0\n"
    repo, _ = make_repo({**example_files, "conda.yaml": None, "requirements.txt": requirements})

    result = env_builder.build({"repo_url": f"file://{repo}"}, build_workdir)

    assert isinstance(result, BuildResult), result
    assert result.artifact.dependency_file == "requirements.txt"
    assert result.warnings == ()
    out = run_in_env(
        result.artifact.python,
        "import importlib.metadata as m, sklearn, sys, termcolor;"
        "print(m.version('termcolor'), m.version('tomli-w'), sklearn.__file__.startswith(sys.prefix))",
        result.artifact.repo_dir,
    )
    assert out == "2.4.0 1.0.0 False"


def test_pinned_older_commit_over_file_url_checks_out_that_commit(
    make_repo: GitRepo, example_files: dict[str, str | None], env_builder: EnvBuilder, build_workdir: Path
) -> None:
    _, old = make_repo({**example_files, "VERSION": "old\n"}, "old")
    repo, head = make_repo({"VERSION": "new\n"}, "new")
    assert old != head

    result = env_builder.build({"repo_url": f"file://{repo}", "commit": old}, build_workdir)

    assert isinstance(result, BuildResult), result
    assert result.artifact.commit == old
    assert (Path(result.artifact.repo_dir) / "VERSION").read_text() == "old\n"


def test_concurrent_builds_of_one_key_build_once(
    make_repo: GitRepo, example_files: dict[str, str | None], env_builder: EnvBuilder, build_workdir: Path
) -> None:
    repo, sha = make_repo({**example_files, "VERSION": "concurrent\n"})
    spec = {"repo_url": str(repo), "commit": sha}
    results: list[BuildResult | BuildFailure] = []

    threads = [threading.Thread(target=lambda: results.append(env_builder.build(spec, build_workdir)))]
    threads.append(threading.Thread(target=lambda: results.append(env_builder.build(spec, build_workdir))))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)

    assert len(results) == 2
    assert all(isinstance(r, BuildResult) for r in results), results
    assert sorted(r.cached for r in results if isinstance(r, BuildResult)) == [False, True]
