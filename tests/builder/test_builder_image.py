"""The builder image (``flops.builder.builder_image``) and the shared bases a build in it pulls: in the run's
registry (``tests.image_support.built``), made once per key on this machine. A whole build inside it takes minutes
(vfs copies), so that runs in ``flops demo --oakestra`` and by hand, not here; the Oakestra demo test runs its
cache-hit path in a container.
"""

from __future__ import annotations

import subprocess
import uuid

from flops.builder.image_backend import native_platform, shared_ref
from tests.image_support import PODMAN, PODMAN_RUN, Built, buildah


def test_the_builder_image_runs_buildah_with_vfs_and_the_build_worker(builder_image: str, built: Built) -> None:
    client = built.builder.client()
    assert client.has_image(builder_image, [native_platform()])
    script = "buildah info --format '{{.store.GraphDriverName}}' && python -m flops.builder.worker --help >/dev/null"
    done = subprocess.run(
        [*PODMAN, *PODMAN_RUN, builder_image, "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "vfs"  # no overlay on the container's own overlay


def test_a_shared_base_is_pulled_back_with_its_image_id(built: Built) -> None:
    """A builder without the runtime (in a container) pulls it by the key the host built it under: the pulled
    image keeps its id, so the keys of the images built FROM it (deps) match the host's too."""
    builder, platform = built.builder, native_platform()
    debian = f"localhost/flops/debian:bookworm-{platform.replace('/', '-')}"
    local = f"localhost/flops/sharetest:{uuid.uuid4().hex[:12]}-linux-amd64"
    buildah("tag", debian, local, check=True)
    try:
        remote = builder.share(local, platform)
        assert remote == shared_ref(builder.settings.registry, local) and builder._remote_has(remote, platform)
        buildah("rmi", local, check=True)  # only the name: debian keeps the image

        assert builder._pull_shared(remote, local, platform)
        assert builder._image_id(local) == builder._image_id(debian)
        assert not builder._pull_shared(remote + "-missing", local + "-missing", platform)
    finally:
        buildah("rmi", local)
        buildah("rmi", remote)
