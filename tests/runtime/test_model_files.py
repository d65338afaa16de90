"""Model files in the run's registry (the Oakestra hand-over's format): what a model builder refuses to unpack."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from flops.registry import RegistryError, RunningRegistry
from flops.runtime import model_files


def crafted(registry: RunningRegistry, name: str, tag: str) -> str:
    """Model files whose one layer holds ``name``, pushed as an aggregator would; their ``oci://`` reference."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    client, repository = registry.client(), "acme/model-files"
    manifest = {
        "schemaVersion": 2,
        "mediaType": model_files.MANIFEST_TYPE,
        "artifactType": model_files.ARTIFACT_TYPE,
        "config": {"mediaType": model_files.EMPTY_TYPE, "digest": client.push_blob(repository, b"{}"), "size": 2},
        "layers": [
            {
                "mediaType": model_files.LAYER_TYPE,
                "digest": client.push_blob(repository, out.getvalue()),
                "size": len(out.getvalue()),
            }
        ],
    }
    return f"oci://{registry.address}/{repository}@{client.put_manifest(repository, tag, manifest)}"


@pytest.mark.parametrize("name", ["../outside", "/etc/outside", "a/../../outside"])
def test_a_layer_naming_a_file_outside_its_directory_is_refused_and_nothing_lands_outside(
    registry: RunningRegistry, tmp_path: Path, name: str
) -> None:
    ref = crafted(registry, name, "p-crafted")

    with pytest.raises(RegistryError, match="no plain relative file"):
        model_files.pull(ref, tmp_path / "in" / "model")

    assert not (tmp_path / "in" / "outside").exists() and not (tmp_path / "outside").exists()


def test_an_image_is_no_model_files(registry: RunningRegistry, tmp_path: Path) -> None:
    client = registry.client()
    config = b'{"architecture": "amd64", "os": "linux"}'
    manifest = {
        "schemaVersion": 2,
        "mediaType": model_files.MANIFEST_TYPE,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": client.push_blob("acme/notmodel", config),
            "size": len(config),
        },
        "layers": [],
    }
    digest = client.put_manifest("acme/notmodel", "x", manifest)

    with pytest.raises(RegistryError, match="not model files"):
        model_files.pull(f"oci://{registry.address}/acme/notmodel@{digest}", tmp_path / "model")
