"""Packaging a trained model with its code, requirements and a serving manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flops.builder import ArtifactRef, package_model


def test_package_holds_model_code_requirements_and_manifest(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "model_manager.py").write_text("class ModelManager: ...\n")
    model = tmp_path / "best"
    model.mkdir()
    (model / "weights.npz").write_bytes(b"\x00")
    ref = ArtifactRef(
        key="k1",
        python="/envs/k1/venv/bin/python",
        repo_dir=str(repo),
        repo_url="file:///repo",
        commit="a" * 40,
        flavor="default",
        platforms=(),
        dependency_file="requirements.txt",
        requirements=("scikit-learn",),
    )

    package = package_model(model, ref.model_dump(), repo, tmp_path / "pkg")

    assert (package.path / "model" / "weights.npz").is_file()
    assert (package.path / "code" / "model_manager.py").is_file()
    assert not (package.path / "code" / ".git").exists()
    assert (package.path / "requirements.txt").read_text() == "scikit-learn\n"
    manifest = json.loads((package.path / "manifest.json").read_text())
    assert manifest == package.manifest
    assert manifest["python"] == ref.python
    assert manifest["model_files"] == ["weights.npz"]
    assert manifest["commit"] == ref.commit
    with pytest.raises(FileExistsError):
        package_model(model, ref, repo, tmp_path / "pkg")
