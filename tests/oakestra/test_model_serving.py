"""Post-training on Oakestra from the model files an aggregator pushed: the trained-model image is built from them
(:mod:`flops.builder.model_image`, as the model builder service runs it) and served by the Oakestra adapter as a
service of the fake System Manager, which runs it as a real podman container. The URL the server reports (the
project's ``model_url``) is its service IP, where MLflow's scoring server answers predictions behind the
project's token.

Uses the run's shared image build (``tests.image_support.built``: its registry and the example's learner image).
"""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from flops.builder.model_image import ModelImageBuilder, parse_spec
from flops.messages import new_id
from flops.oakestra.actors import ActorConfig, service_ip
from flops.oakestra.adapter import AdapterConfig, OakestraAdapter
from flops.oakestra.client import SystemManager
from flops.oakestra.fake import FakeSystemManager
from flops.oakestra.fake_podman import PodmanOptions, PodmanRunner
from flops.oakestra.fake_state import FakeState, cluster_doc
from flops.oakestra.seats import seat_id
from flops.ports import free_port
from flops.runtime import model_files
from flops.settings import BrokerAddress
from tests.base_support import held_out_digits, invoke_model, train_example_model
from tests.image_support import DRIVER, Built, buildah
from tests.oakestra.test_adapter import TIMING, ManagerSide
from tests.support import wait_until

pytestmark = [pytest.mark.timeout(1500)]
SERVED_TIMEOUT = 300.0  # the container's start (~9 s here) and MLflow loading the model, on a busy 2-core host


@pytest.fixture
def trained_model_image(built: Built, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(project id, trained-model image): the example's model saved as an aggregator saves it, pushed as its model
    files, and built into an image from the ``oci://`` reference the aggregator's report would carry."""
    artifact = built.ok().artifact
    project_id = f"p-{uuid.uuid4().hex[:12]}"
    model_dir = tmp_path / "aggregator" / "model"
    model_dir.mkdir(parents=True)
    np.savez(model_dir / "model.npz", *train_example_model()[0])
    (model_dir / "metrics.json").write_text('{"best_round": 1}')
    registry = built.registry.address
    model_ref = model_files.push(model_dir, model_files.target(registry, "acme", project_id))
    details = {"kind": "image", "images": artifact.images, "flavor": "sklearn"}  # type: ignore[union-attr]
    raw = {"artifact": {"details": details}, "model": {"model_ref": model_ref}}
    spec = parse_spec({**raw, "customer": "acme", "project_id": project_id})
    ref = ModelImageBuilder(registry, tmp_path / "builder", storage_driver=DRIVER).build(spec)
    try:
        yield project_id, ref
    finally:
        buildah("rmi", ref)


def test_a_pushed_model_becomes_an_image_that_oakestra_serves_at_its_service_ip_behind_the_token(
    broker: BrokerAddress, built: Built, trained_model_image: tuple[str, str], tmp_path: Path
) -> None:
    project_id, ref = trained_model_image
    assert ref == f"{built.registry.address}/acme/trained_model:{project_id}"
    tag = uuid.uuid4().hex[:8]
    seat, port, token = seat_id(f"serve{tag}"), free_port(), uuid.uuid4().hex
    state = FakeState(runner=PodmanRunner(PodmanOptions(storage_driver=DRIVER, tls_verify=False)))
    state.clusters = [cluster_doc({"cluster_name": f"serve{tag}", "supported_addons": []}, 0)]
    config = AdapterConfig(
        actors=ActorConfig(broker_url=broker.url, registry=built.registry.address, serve_port=port),
        state_dir=tmp_path / "oakestra",
        timing=TIMING,
        client_id=new_id("test-oakestra"),
    )
    side = ManagerSide(broker, tag)
    with FakeSystemManager(state=state) as fake:
        adapter = OakestraAdapter(SystemManager(fake.url, timeout=5), broker, config).start()
        try:
            side.status(seat)
            serve = side.command(seat, project_id, "serve_model", image_ref=f"image://{ref}", token=token)
            served = side.report(serve.command_id, "model.served", timeout=SERVED_TIMEOUT)

            ip = service_ip(project_id, seat, port)
            assert served["url"] == f"http://{ip}:{port}/"  # the service IP: where users reach it through Oakestra
            x_test, y_test = held_out_digits()
            assert float(np.mean(invoke_model(served["url"], x_test, token) == y_test)) > 0.85
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(served["url"] + "invocations", data=b"{}", timeout=30)
            assert refused.value.code == 401

            side.command(seat, project_id, "stop_project", keep=[])
            wait_until(lambda: project_id not in adapter.placements, 60, "the project's application deleted")
        finally:
            adapter.stop()
            side.close()
    loopback = subprocess.run(["ip", "addr", "show", "lo"], capture_output=True, text=True, timeout=10, check=True)
    assert f"{ip}/32" not in loopback.stdout
