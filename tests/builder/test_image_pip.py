"""What a build's pip inherits from this host: indexes, find-links, constraints and the CA bundle (no buildah)."""

from __future__ import annotations

from pathlib import Path

from flops.builder.image_backend import ImageBuilder, ImageBuilderSettings, host_pip_options
from flops.builder.result import BuildSpec


def test_host_pip_settings_are_carried_into_the_build(tmp_path: Path) -> None:
    index = tmp_path / "pypi" / "simple"
    index.mkdir(parents=True)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    constraint = tmp_path / "constraints.txt"
    constraint.write_text("torch<=2.14.1\n")
    build = tmp_path / "build"
    build.mkdir()
    config = {
        "cert": str(ca),
        "index-url": "https://pypi.example/simple",
        "extra-index-url": f"file://{index} file:///nowhere/simple",
        "find-links": str(wheels),
        "constraint": str(constraint),
        "timeout": "180",
        "target": "/somewhere",  # would break the build: not carried
    }
    options, mounts = host_pip_options(config, build)
    assert options == {
        "cert": "/flops-build/ca.crt",
        "index-url": "https://pypi.example/simple",
        "extra-index-url": f"file://{index}",  # a directory this host lacks is dropped
        "find-links": str(wheels),
        "constraint": "/flops-build/constraints.txt",
        "timeout": "180",
    }
    assert (build / "ca.crt").read_text() == ca.read_text()
    assert "torch<=2.14.1" in (build / "constraints.txt").read_text()
    assert mounts == sorted([str(index.parent.resolve()), str(wheels.resolve())])  # simple/'s parent holds files/


def test_platforms_default_to_the_builders_own() -> None:
    builder = ImageBuilder(ImageBuilderSettings())
    assert builder.platforms(BuildSpec(repo_url="x", platforms=("linux/arm64", "Linux/AMD64", "linux/arm64"))) == (
        "linux/amd64",
        "linux/arm64",
    )
    (own,) = builder.platforms(BuildSpec(repo_url="x"))
    assert own.startswith("linux/")


def test_the_worker_reports_an_image_artifact_by_its_image_ref() -> None:
    from flops.builder.result import BuildResult, ImageArtifactRef
    from flops.builder.worker import artifact_report

    images = {r: f"127.0.0.1:5000/acme/digits/{r}:c0ffee" for r in ("base", "learner", "aggregator")}
    artifact = ImageArtifactRef(
        key="k1",
        ref="image://127.0.0.1:5000/acme/digits:c0ffee",
        images=images,
        digest="sha256:00",
        repo_url="https://github.com/acme/digits",
        commit="c0ffee",
        flavor="sklearn",
        platforms=("linux/amd64",),
        dependency_file="requirements.txt",
        requirements=("numpy",),
    )
    payload = BuildResult(artifact=artifact, cached=True, duration_s=0.1).to_payload()
    report = artifact_report(payload)
    assert report["artifact"]["ref"] == "image://127.0.0.1:5000/acme/digits:c0ffee"
    assert report["artifact"]["details"]["images"] == images
    assert BuildResult.model_validate(payload | {"kind": "build.succeeded"}).artifact == artifact
