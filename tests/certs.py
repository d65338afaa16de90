"""Throwaway certificates for tests, made by the same code as `flops setup production` (flops.setup): a CA and
one certificate for 127.0.0.1 signed by it."""

from __future__ import annotations

from pathlib import Path

from flops import setup


def fleet_certificates(directory: Path, *, cert: str = "node.crt", key: str = "node.key") -> dict[str, Path]:
    """``ca.crt`` and a server certificate + key for 127.0.0.1 in ``directory``; their paths by role."""
    authority = setup.new_authority("flops test CA")
    cert_pem, key_pem = setup.issue(authority, "127.0.0.1", hosts=["127.0.0.1"], server=True, client=True)
    directory.mkdir(parents=True, exist_ok=True)
    files = {"ca": directory / "ca.crt", "cert": directory / cert, "key": directory / key}
    files["ca"].write_bytes(authority.cert_pem())
    files["cert"].write_bytes(cert_pem)
    files["key"].write_bytes(key_pem)
    return files
