"""The FLOps image registry: Debian's ``docker-registry`` on loopback, and the client the builder's cache check uses.

``start_registry`` writes a config (``http.addr``, filesystem storage under the data directory, TLS when a
certificate and key are given), starts ``docker-registry serve CONFIG`` as a child that dies with us, and
returns once ``/v2/`` answers. Development runs plain HTTP on 127.0.0.1; with the production CA's
certificate it serves HTTPS.

``RegistryClient`` speaks the registry HTTP API (distribution spec v2) with the standard library: the tags of a
repository, a manifest, and the platforms an image reference provides (a manifest list / OCI index names
them; a single manifest's config blob does). ``has_image(ref, platforms)`` is the cache check: the tag exists
and provides every requested platform. It also pushes and reads blobs and manifests, for the small artifacts
that are no images (an Oakestra aggregator's model files, :mod:`flops.runtime.model_files`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from flops.builder.images import parse_platform, parse_ref
from flops.errors import ConfigError, FlopsError, TimedOut
from flops.ports import port_open

log = structlog.get_logger(__name__)

DEFAULT_PORT = 5000
REGISTRY_BINARY = "docker-registry"
MANIFEST_LIST_TYPES = (
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
)
MANIFEST_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
)


class RegistryError(FlopsError):
    """The registry cannot be started or did not answer as the distribution API says it should."""


def registry_config(
    storage_dir: Path, host: str, port: int, *, cert_file: Path | None = None, key_file: Path | None = None
) -> dict[str, Any]:
    """The ``docker-registry`` configuration: loopback address, filesystem storage, deletes allowed, TLS opt-in."""
    http: dict[str, Any] = {"addr": f"{host}:{port}", "headers": {"X-Content-Type-Options": ["nosniff"]}}
    if cert_file or key_file:
        if not (cert_file and key_file):
            raise ConfigError("the registry needs both FLOPS_TLS_CERT_FILE and FLOPS_TLS_KEY_FILE for TLS")
        http["tls"] = {"certificate": str(cert_file), "key": str(key_file)}
    return {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(storage_dir)}, "delete": {"enabled": True}},
        "http": http,
    }


@dataclass
class RunningRegistry:
    """A ``docker-registry`` child of this process; ``address`` is ``host:port`` as image references use it."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    tls: bool
    config_file: Path
    log_file: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}"

    def client(self, ca_file: Path | None = None) -> RegistryClient:
        return RegistryClient(self.address, tls=self.tls, ca_file=ca_file)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the registry exits (True) or ``timeout`` passes (False)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def stop(self) -> None:
        from flops.supervisor import stop_groups

        if self.proc.poll() is None:
            stop_groups([self.proc])
        log.info("registry stopped", address=self.address, exit=self.proc.returncode)


def registry_port(address: str) -> int:
    """The port of a ``host:port`` registry address (:data:`DEFAULT_PORT` when it names none)."""
    _, sep, port = address.rpartition(":")
    return int(port) if sep and port.isdigit() else DEFAULT_PORT


def start_registry(
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    ca_file: Path | None = None,
    timeout_s: float = 20.0,
) -> RunningRegistry:
    """Start ``docker-registry`` with its storage under ``data_dir`` and return once ``/v2/`` answers."""
    from flops.supervisor import popen

    binary = shutil.which(REGISTRY_BINARY) or next(
        (p for p in ("/usr/bin/docker-registry", "/usr/sbin/docker-registry") if Path(p).exists()), None
    )
    if binary is None:
        raise RegistryError("docker-registry is not installed (Debian: apt-get install docker-registry)")
    if port_open(host, port):
        raise RegistryError(f"{host}:{port} is already in use; pick another registry port")
    data_dir.mkdir(parents=True, exist_ok=True)
    config = registry_config(data_dir / "storage", host, port, cert_file=cert_file, key_file=key_file)
    config_file = data_dir / "config.yml"
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
    log_file = data_dir / "registry.log"
    with log_file.open("ab") as out:
        proc = popen([binary, "serve", str(config_file)], stdout=out, stderr=subprocess.STDOUT)
    running = RunningRegistry(proc, host, port, tls=cert_file is not None, config_file=config_file, log_file=log_file)
    client = running.client(ca_file)
    deadline = time.monotonic() + timeout_s
    while not client.ping():
        if proc.poll() is not None:
            tail = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
            raise RegistryError(f"docker-registry exited {proc.returncode}: {' '.join(tail)}")
        if time.monotonic() > deadline:
            running.stop()
            raise TimedOut(f"docker-registry did not answer on {running.url}/v2/ within {timeout_s:.0f} s")
        time.sleep(0.1)
    log.info("registry started", url=running.url, storage=str(data_dir / "storage"))
    return running


class RegistryClient:
    """The few distribution-API calls the builder needs, over HTTP(S) with the standard library."""

    def __init__(
        self, address: str, *, tls: bool = False, ca_file: Path | None = None, timeout_s: float = 10.0
    ) -> None:
        self.address = address
        self.base = f"{'https' if tls else 'http'}://{address}"
        self.timeout_s = timeout_s
        self._ssl = ssl.create_default_context(cafile=str(ca_file) if ca_file else None) if tls else None

    def _get(self, path: str, accept: Iterable[str] = ()) -> tuple[int, dict[str, str], bytes]:
        return self._request("GET", path, headers={"Accept": ", ".join(accept)} if accept else {})

    def _request(
        self, method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one call; ``url`` is a path on the registry or an absolute URL it gave."""
        full = url if "://" in url else self.base + url
        request = urllib.request.Request(full, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self._ssl) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def ping(self) -> bool:
        """Whether the registry answers ``GET /v2/`` (200, or 401 when it wants credentials)."""
        try:
            status, _, _ = self._get("/v2/")
        except (OSError, urllib.error.URLError):
            return False
        return status in (200, 401)

    def tags(self, repository: str) -> list[str]:
        """The tags of ``repository`` (empty when the repository does not exist)."""
        status, _, body = self._get(f"/v2/{repository}/tags/list")
        if status == 404:
            return []
        if status != 200:
            raise RegistryError(f"{self.base}: listing tags of {repository} answered {status}")
        return list(json.loads(body).get("tags") or [])

    def manifest(self, repository: str, reference: str) -> tuple[str, dict[str, Any]] | None:
        """(media type, manifest) of ``repository:reference``, or None when there is none."""
        status, headers, body = self._get(
            f"/v2/{repository}/manifests/{reference}", accept=(*MANIFEST_LIST_TYPES, *MANIFEST_TYPES)
        )
        if status == 404:
            return None
        if status != 200:
            raise RegistryError(f"{self.base}: manifest {repository}:{reference} answered {status}")
        document = json.loads(body)
        media_type = document.get("mediaType") or headers.get("Content-Type", "").split(";")[0]
        return media_type, document

    def platforms(self, repository: str, reference: str) -> set[str] | None:
        """The ``os/arch[/variant]`` platforms ``repository:reference`` provides, or None when it does not exist."""
        found = self.manifest(repository, reference)
        if found is None:
            return None
        media_type, document = found
        if media_type in MANIFEST_LIST_TYPES or "manifests" in document:
            return {_platform(m.get("platform") or {}) for m in document.get("manifests", [])} - {""}
        digest = (document.get("config") or {}).get("digest")
        if not digest:
            return set()
        status, _, body = self._get(f"/v2/{repository}/blobs/{digest}")
        if status != 200:
            raise RegistryError(f"{self.base}: config blob of {repository}:{reference} answered {status}")
        return {_platform(json.loads(body))} - {""}

    def digest(self, repository: str, reference: str) -> str | None:
        """The registry's digest of ``repository:reference`` (``Docker-Content-Digest``)."""
        status, headers, _ = self._get(
            f"/v2/{repository}/manifests/{reference}", accept=(*MANIFEST_LIST_TYPES, *MANIFEST_TYPES)
        )
        if status != 200:
            return None
        return _header(headers, "Docker-Content-Digest")

    def push_blob(self, repository: str, data: bytes) -> str:
        """Upload ``data`` as a blob of ``repository`` (monolithic: one POST, one PUT); its digest. A blob the
        registry holds already is not sent again."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        status, _, _ = self._request("HEAD", f"/v2/{repository}/blobs/{digest}")
        if status == 200:
            return digest
        status, headers, body = self._request("POST", f"/v2/{repository}/blobs/uploads/", b"")
        location = _header(headers, "Location")
        if status != 202 or not location:
            raise RegistryError(f"{self.base}: starting an upload to {repository} answered {status}: {body[:200]!r}")
        parts = urllib.parse.urlsplit(urllib.parse.urljoin(self.base + "/", location))
        query = "&".join(q for q in (parts.query, urllib.parse.urlencode({"digest": digest})) if q)
        target = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
        status, _, body = self._request("PUT", target, data, {"Content-Type": "application/octet-stream"})
        if status != 201:
            raise RegistryError(f"{self.base}: uploading {digest} to {repository} answered {status}: {body[:200]!r}")
        return digest

    def put_manifest(self, repository: str, reference: str, manifest: dict[str, Any]) -> str:
        """Store ``manifest`` (its ``mediaType`` says which kind) as ``repository:reference``; its digest."""
        raw = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
        media_type = str(manifest.get("mediaType") or MANIFEST_TYPES[1])
        status, headers, body = self._request(
            "PUT", f"/v2/{repository}/manifests/{reference}", raw, {"Content-Type": media_type}
        )
        if status != 201:
            raise RegistryError(f"{self.base}: manifest {repository}:{reference} refused ({status}): {body[:300]!r}")
        return _header(headers, "Docker-Content-Digest") or "sha256:" + hashlib.sha256(raw).hexdigest()

    def blob(self, repository: str, digest: str) -> bytes:
        """The blob ``digest`` of ``repository``, checked against its digest."""
        status, _, body = self._get(f"/v2/{repository}/blobs/{digest}")
        if status != 200:
            raise RegistryError(f"{self.base}: blob {digest} of {repository} answered {status}")
        algorithm, _, expected = digest.partition(":")
        if algorithm != "sha256" or hashlib.sha256(body).hexdigest() != expected:
            raise RegistryError(f"{self.base}: blob {digest} of {repository} does not match its digest")
        return body

    def has_image(self, ref: str, platforms: Iterable[str]) -> bool:
        """Whether ``ref``'s tag exists and provides every platform in ``platforms`` (the cache check)."""
        _, repository, tag = parse_ref(ref)
        if tag not in self.tags(repository):
            return False
        provided = self.platforms(repository, tag) or set()
        return all(platform_provided(p, provided) for p in platforms)


def platform_provided(wanted: str, provided: Iterable[str]) -> bool:
    """Whether ``wanted`` (``linux/arm64``) is among ``provided``; a variant counts only when asked for."""
    os_, arch, variant = parse_platform(wanted)
    for item in provided:
        p_os, p_arch, p_variant = parse_platform(item)
        if (p_os, p_arch) == (os_, arch) and (not variant or variant == p_variant):
            return True
    return False


def has_image(
    ref: str, platforms: Iterable[str], *, tls: bool = False, ca_file: Path | None = None, timeout_s: float = 10.0
) -> bool:
    """Whether the registry in ``ref`` holds its tag with every platform in ``platforms``.

    An unreachable registry is a miss (the build then fails at its push, naming the registry), not an error.
    """
    registry, _, _ = parse_ref(ref)
    client = RegistryClient(registry, tls=tls, ca_file=ca_file, timeout_s=timeout_s)
    with contextlib.suppress(OSError, urllib.error.URLError):
        return client.has_image(ref, platforms)
    return False


def _header(headers: dict[str, str], name: str) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == name.lower()), None)


def _platform(spec: dict[str, Any]) -> str:
    os_, arch = spec.get("os", ""), spec.get("architecture", "")
    if not (os_ and arch):
        return ""
    variant = spec.get("variant", "")
    return f"{os_}/{arch}/{variant}" if variant else f"{os_}/{arch}"
