"""The aggregator's model directory as a small OCI artifact in the FLOps registry: how a model trained on Oakestra
reaches the model builder.

On a FLOps agent the aggregator writes ``model.npz`` and ``metrics.json`` to a directory of its host and the model
builder (``build_model_image``, sent to the same agent) reads them there. On Oakestra the aggregator is a service:
its container, and the ``--model-out`` directory in it, is gone once it exits, and the model builder is another
service, perhaps on another node. So the aggregator's reporter (:mod:`flops.oakestra.shim`) pushes the directory,
before ``training.succeeded`` goes out, to ``<registry>/<customer>/model-files:<project id>``: an OCI manifest whose
``artifactType`` says what it holds, the empty config and one gzipped tar layer of the directory's files. The
report's ``model_ref`` becomes ``oci://<registry>/<customer>/model-files@sha256:<manifest digest>``, pinned to what
this aggregator pushed whatever is pushed to the tag later; :mod:`flops.builder.model_image` pulls it when the
``model_ref`` it is given is such a reference, and a local path still means a file on the agent (agents unchanged).

Why the registry: every Oakestra actor already pulls its image from it, so the aggregator's node and the model
builder's reach it with the TLS they have; the broker carries no model weights. Why an artifact and not an image:
``buildah`` is not in the aggregator's image and the builder needs files, not a root filesystem; a blob upload is
two plain HTTP requests (:class:`flops.registry.RegistryClient`, standard library only), so the runtime image gets
no new dependency.
"""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from flops.builder.images import component, parse_ref
from flops.registry import RegistryClient, RegistryError

SCHEME = "oci://"
REPOSITORY = "model-files"
ARTIFACT_TYPE = "application/vnd.flops.model-files.v1"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"  # the OCI image spec's empty config of an artifact
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
TIMEOUT_S = 60.0  # per registry call: the files are a model's parameters and metrics, not an image


def target(registry: str, customer: str, project_id: str) -> str:
    """``<registry>/<customer>/model-files:<project id>``, where a project's aggregator pushes its model files."""
    return f"{registry}/{component(customer, 'customer')}/{REPOSITORY}:{component(project_id, 'p')}"


def is_remote(model_ref: str) -> bool:
    """Whether a ``training.succeeded`` model_ref names pushed model files rather than a path on the agent."""
    return model_ref.startswith(SCHEME)


def push(model_dir: Path, to: str, *, tls: bool = False, ca_file: Path | None = None) -> str:
    """Push the files under ``model_dir`` to the tag ``to`` (``registry/repository:tag``); the ``oci://`` reference
    of what was pushed, by digest. Raises RegistryError (or OSError: unreachable, unreadable)."""
    registry, repository, tag = parse_ref(to)
    client = RegistryClient(registry, tls=tls, ca_file=ca_file, timeout_s=TIMEOUT_S)
    layer = _tar_gz(model_dir)
    empty = b"{}"
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_TYPE, "digest": client.push_blob(repository, empty), "size": len(empty)},
        "layers": [{"mediaType": LAYER_TYPE, "digest": client.push_blob(repository, layer), "size": len(layer)}],
    }
    digest = client.put_manifest(repository, tag, manifest)
    return f"{SCHEME}{registry}/{repository}@{digest}"


def pull(model_ref: str, dest: Path, *, tls: bool = False, ca_file: Path | None = None) -> Path:
    """Unpack the model files ``model_ref`` (``oci://…``) names into ``dest`` (emptied first); ``dest``.
    Raises RegistryError (or OSError)."""
    registry, repository, reference = parse_ref(model_ref.removeprefix(SCHEME))
    client = RegistryClient(registry, tls=tls, ca_file=ca_file, timeout_s=TIMEOUT_S)
    found = client.manifest(repository, reference)
    if found is None:
        raise RegistryError(f"{model_ref}: no such model files in the registry")
    _, manifest = found
    layers = [d for d in manifest.get("layers") or [] if d.get("mediaType") == LAYER_TYPE]
    if manifest.get("artifactType") != ARTIFACT_TYPE or len(layers) != 1:
        raise RegistryError(f"{model_ref}: not model files (artifactType {manifest.get('artifactType')!r})")
    blob = client.blob(repository, str(layers[0]["digest"]))
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    _untar_gz(blob, dest)
    return dest


def _tar_gz(model_dir: Path) -> bytes:
    """The regular files under ``model_dir`` (relative names, sorted), as a gzipped tar."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and not p.is_symlink())
    if not files:
        raise RegistryError(f"no model files in {model_dir}")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for path in files:
            tar.add(path, arcname=path.relative_to(model_dir).as_posix(), recursive=False)
    return out.getvalue()


def _untar_gz(blob: bytes, dest: Path) -> None:
    """Regular files only, each below ``dest``: the layer comes from the network (Python 3.11.2, the images'
    interpreter, has no extraction filters)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            for member in tar:
                name = PurePosixPath(member.name)
                if member.isdir():
                    continue
                if not member.isfile() or name.is_absolute() or ".." in name.parts:
                    raise RegistryError(f"model files hold {member.name!r}, which is no plain relative file")
                path = dest.joinpath(*name.parts)
                path.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # a regular file
                with path.open("wb") as out:
                    shutil.copyfileobj(source, out)
    except (tarfile.TarError, gzip.BadGzipFile, EOFError) as exc:
        raise RegistryError(f"model files layer unreadable: {exc}") from exc
