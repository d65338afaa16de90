"""``flops api`` on a node with a certificate serves HTTPS only, as the web view does."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flops.settings import BrokerAddress
from tests.api.support import ApiProc
from tests.certs import fleet_certificates

TOKEN = "https-token-" + "e" * 24


def test_with_a_certificate_the_api_speaks_https_only(broker: BrokerAddress, tmp_path: Path) -> None:
    certs = fleet_certificates(tmp_path / "certs")
    (tmp_path / "tokens.json").write_text(json.dumps({"customers": {"alice": {"token": TOKEN}}}))
    env = {
        "FLOPS_BROKER_URL": broker.url,
        "FLOPS_DATA_DIR": str(tmp_path / "data"),
        "FLOPS_API_TOKENS_FILE": str(tmp_path / "tokens.json"),
        "FLOPS_TLS_CERT_FILE": str(certs["cert"]),
        "FLOPS_TLS_KEY_FILE": str(certs["key"]),
        "FLOPS_TRACKING_URI": "http://127.0.0.1:5005",
    }
    api = ApiProc(tmp_path / "api", env, ca_file=certs["ca"]).start()
    try:
        assert api.url.startswith("https://")
        answer = api.go_get("/api/flops/tracking", TOKEN, {"customerID": "Admin"})
        assert (answer.status, answer.body) == (200, {"tracking_server_url": "http://127.0.0.1:5005"})
        # Plain HTTP to the same port gets no answer a client could read a token from.
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{api.port}/healthz", timeout=5)
    finally:
        api.stop()
