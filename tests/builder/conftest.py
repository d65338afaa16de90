"""Fixtures for builder tests: throwaway ML repos in git, and one builder workdir per test session so
the runtime base env is built once and shared, as on a real builder."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from flops.builder import BuilderSettings, EnvBuilder

MODEL_MANAGER = """\
import numpy as np
from sklearn.linear_model import LogisticRegression

N_CLASSES, N_FEATURES = 10, 64


class ModelManager:
    def __init__(self):
        # Parameters exist before any data arrives, as Flower asks for them before round one.
        self.model = LogisticRegression(max_iter=50)
        self.model.classes_ = np.arange(N_CLASSES)
        self.model.coef_ = np.zeros((N_CLASSES, N_FEATURES))
        self.model.intercept_ = np.zeros(N_CLASSES)

    def set_model_data(self):
        raise RuntimeError("the builder must not load data")

    def get_model(self):
        return self.model

    def get_model_parameters(self):
        return [self.model.coef_, self.model.intercept_]

    def set_model_parameters(self, parameters):
        self.model.coef_, self.model.intercept_ = parameters

    def fit_model(self):
        return 0

    def evaluate_model(self):
        return 0.0, 0.0, 0
"""

DATA_MANAGER = """\
class DataManager:
    def __init__(self):
        self.data = None
"""

CONDA_YAML = """\
name: digits
channels: [conda-forge]
dependencies:
  - python=3.8
  - pip
  - pip:
    - scikit-learn
"""

GitRepo = Callable[..., tuple[Path, str]]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, timeout=30
    ).stdout.strip()


@pytest.fixture
def make_repo(tmp_path: Path) -> GitRepo:
    """`make_repo(files)` commits `files` (name → text; None deletes) to a repo in tmp_path and
    returns (repo path, commit sha). Calling it again adds a commit to the same repo."""
    repo = tmp_path / "ml-repo"

    def commit(files: dict[str, str | None], message: str = "update") -> tuple[Path, str]:
        if not repo.exists():
            repo.mkdir()
            git(repo, "init", "-q", "-b", "main")
            git(repo, "config", "user.email", "test@flops.invalid")
            git(repo, "config", "user.name", "test")
        for name, text in files.items():
            if text is None:
                (repo / name).unlink(missing_ok=True)
            else:
                (repo / name).write_text(text, encoding="utf-8")
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", message)
        return repo, git(repo, "rev-parse", "HEAD")

    return commit


@pytest.fixture
def example_files() -> dict[str, str | None]:
    return {"model_manager.py": MODEL_MANAGER, "data_manager.py": DATA_MANAGER, "conda.yaml": CONDA_YAML}


@pytest.fixture(scope="session")
def build_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("builder")


@pytest.fixture(scope="session")
def env_builder() -> EnvBuilder:
    # Reuse the machine's uv cache across test runs: only a cold machine downloads the runtime.
    cache = Path(os.environ.get("UV_CACHE_DIR", Path.home() / ".cache" / "uv"))
    return EnvBuilder(BuilderSettings(uv_cache_dir=cache, install_timeout_s=300, git_timeout_s=60))
