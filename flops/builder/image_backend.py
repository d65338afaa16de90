"""`ImageBuilder`: turn an ML repo at a pinned commit into container images in the FLOps registry, with buildah.

The image backend of `flops.builder.Builder`, beside the environment backend (the fast development path).
A build makes ``<registry>/<owner>/<repo>/{base,learner,aggregator}:<commit>``, each a manifest list with one
image per requested platform (``spec.platforms``; the builder's own platform when none is asked for):

1. **cache check**: the registry has all three tags and each provides every requested platform -> done,
   nothing is built (``cached=True``).
2. clone at the commit (``repo.checkout``) and check the repo contract (``contract.check_contract``).
3. per platform: the **Debian base** (``FLOPS_BASE_IMAGE``, else ``debootstrap --variant=minbase`` once into a
   cache, imported with ``buildah from scratch`` and pushed to the registry), the shared **runtime** image
   (kept in buildah's local storage, rebuilt only when the runtime requirements change), then the repo's
   **base**, **learner** and **aggregator** with ``buildah bud --isolation chroot``. A foreign platform runs
   under QEMU user emulation; where none is registered the build fails naming that platform before
   anything is built (never a silently single-platform image).
4. ``buildah manifest create/add/push --all`` per role.

pip inside the builds: on the builder's own platform it uses this host's index settings (``pip config list``:
indexes, find-links, constraints, the CA bundle for intercepted TLS; local index directories are mounted
read-only into the ``RUN`` steps). Emulated platforms install offline from a wheelhouse the host downloads
for them (``pip download --only-binary=:all: --platform manylinux…_<arch>``), as pip inside an emulated root
cannot be trusted to reach an index.

Every output line of buildah, debootstrap and pip goes to the structlog build log and to the ``on_line``
callback (``(step, line)``: the build's progress events). A failure is a `BuildFailure` whose reason names
the step and quotes the tool, with the output tail as its log tail.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform as host_platform
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from flops.builder import containerfile as cf
from flops.builder.buildah import LineSink, output, stream, succeeds
from flops.builder.contract import ContractOk, ContractViolation, check_contract
from flops.builder.images import ImageNames, image_names, parse_platform, platform_suffix
from flops.builder.import_check import CHECK_SCRIPT
from flops.builder.locking import file_lock
from flops.builder.process import StepFailed
from flops.builder.repo import checkout, local_path, resolve_commit
from flops.builder.result import BuildFailure, BuildResult, BuildSpec, ImageArtifactRef
from flops.builder.runtime_base import DEFAULT_RUNTIME_REQUIREMENTS, OWN_PACKAGES, own_packages_dir
from flops.registry import RegistryClient

SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
DEBIAN_PACKAGES = ("python3", "python3-venv", "ca-certificates")
QEMU_NAMES = {"arm64": "aarch64", "amd64": "x86_64", "arm": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}
MACHINE_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm"}
WHEEL_ARCH = {"amd64": "x86_64", "arm64": "aarch64", "ppc64le": "ppc64le", "s390x": "s390x"}
# pip options a build may inherit from the host's configuration (others, e.g. `target`, would break it).
PIP_PASSTHROUGH = ("trusted-host", "timeout", "default-timeout", "retries", "proxy", "prefer-binary")


def default_rootfs_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flops" / "rootfs"


def native_platform() -> str:
    machine = host_platform.machine().lower()
    return f"linux/{MACHINE_ARCH.get(machine, machine)}"


@dataclass(frozen=True)
class ImageBuilderSettings:
    """Knobs of the image builder; built in `main()` and passed in (no module-level configuration)."""

    registry: str = "127.0.0.1:5000"
    registry_tls: bool = False
    registry_ca_file: Path | None = None
    base_image: str | None = None  # FLOPS_BASE_IMAGE; None = debootstrap'ed Debian
    rootfs_cache: Path = field(default_factory=default_rootfs_cache)
    debian_suite: str = "bookworm"
    debian_mirror: str = "http://deb.debian.org/debian"
    python_version: str = "3.11.2"  # of the base image's python3 (contract check, wheelhouse tags)
    runtime_requirements: tuple[str, ...] = DEFAULT_RUNTIME_REQUIREMENTS
    host_python: str = field(default_factory=lambda: sys.executable)  # its pip's config and downloads
    storage_driver: str = "overlay"
    isolation: str = "chroot"
    # Push the runtime and dependency images it builds FROM to the registry (``<registry>/flops/runtime:<key>``),
    # so builders in containers (the Oakestra builder image) pull them instead of building them again.
    share_bases: bool = False
    git_timeout_s: float = 300.0
    debootstrap_timeout_s: float = 1800.0
    step_timeout_s: float = 3600.0
    lock_timeout_s: float = 3600.0


class ImageBuilder:
    """The container-image backend of `flops.builder.Builder`."""

    def __init__(self, settings: ImageBuilderSettings | None = None, on_line: LineSink | None = None) -> None:
        self.settings = settings or ImageBuilderSettings()
        self._on_line = on_line
        self._log: Any = structlog.get_logger(__name__)

    # --- the port -----------------------------------------------------------------------------------------

    def build(self, spec: BuildSpec | Mapping[str, Any], workdir: Path) -> BuildResult | BuildFailure:
        """Build (or find in the registry) the images for `spec`; never raises for a bad repo."""
        started = time.monotonic()
        spec = spec if isinstance(spec, BuildSpec) else BuildSpec.model_validate(spec)
        self._log = structlog.get_logger(__name__).bind(repo_url=spec.repo_url, flavor=spec.flavor)
        try:
            result = self._build(spec, Path(workdir), started)
        except StepFailed as exc:
            failure = BuildFailure(
                step=exc.step, reason=exc.reason, log_tail=exc.log_tail, duration_s=time.monotonic() - started
            )
            self._log.warning("image build failed", step=exc.step, reason=exc.reason, duration_s=failure.duration_s)
            return failure
        self._log.info(
            "image build succeeded",
            ref=result.artifact.key,
            cached=result.cached,
            duration_s=round(result.duration_s, 3),
        )
        return result

    def platforms(self, spec: BuildSpec) -> tuple[str, ...]:
        """The platforms to build: the spec's (sorted, deduplicated), else this builder's own."""
        wanted = {"/".join(p for p in parse_platform(x) if p) for x in spec.platforms}
        return tuple(sorted(wanted)) or (native_platform(),)

    def client(self) -> RegistryClient:
        s = self.settings
        return RegistryClient(s.registry, tls=s.registry_tls, ca_file=s.registry_ca_file)

    def cached(self, names: ImageNames, platforms: tuple[str, ...]) -> bool:
        """The cache check: every role's tag is in the registry with every requested platform."""
        client = self.client()
        try:
            return all(client.has_image(names.ref(role), platforms) for role in ("base", "learner", "aggregator"))
        except OSError:
            return False  # registry unreachable: build, and fail at the push naming it

    # --- the build ----------------------------------------------------------------------------------------

    def _build(self, spec: BuildSpec, workdir: Path, started: float) -> BuildResult:
        s = self.settings
        commit = resolve_commit(spec.repo_url, spec.commit, timeout_s=s.git_timeout_s)
        platforms = self.platforms(spec)
        names = image_names(s.registry, spec.repo_url, commit)
        self._log = self._log.bind(commit=commit, platforms=list(platforms))
        if self.cached(names, platforms):
            return self._result(spec, names, platforms, workdir, cached=True, started=started)
        lock = workdir / "locks" / f"image-{names.owner}-{names.repo}-{commit}.lock"
        with file_lock(lock, timeout_s=s.lock_timeout_s):
            if self.cached(names, platforms):  # a concurrent build of the same images finished meanwhile
                return self._result(spec, names, platforms, workdir, cached=True, started=started)
            repo_dir = checkout(spec.repo_url, commit, workdir / "repos", timeout_s=s.git_timeout_s)
            contract = check_contract(repo_dir, _version_tuple(s.python_version))
            if isinstance(contract, ContractViolation):
                raise StepFailed("contract", contract.reason)
            self._check_platforms(platforms)
            built: dict[str, dict[str, str]] = {"base": {}, "learner": {}, "aggregator": {}}
            try:
                for platform in platforms:
                    step_started = time.monotonic()
                    images = self._build_platform(names, platform, repo_dir, contract, spec, workdir)
                    for role, image in images.items():
                        built[role][platform] = image
                    self._progress("images", f"{platform} built in {time.monotonic() - step_started:.1f} s")
                digests = {role: self._push_manifest(names.ref(role), images) for role, images in built.items()}
            finally:
                # Pushed or failed: with vfs local copies of the repo's images cost GBs (full copies), so only
                # the Debian base and the runtime image stay; overlay shares their layers, so an agent on this
                # host starts them without a pull.
                if self.settings.storage_driver == "vfs":
                    self._forget_local(names, platforms)
            record = {"dependency_file": contract.dependency_file, "requirements": list(contract.requirements)}
            record["warnings"] = list(contract.warnings)
            _write_json(self._record_path(workdir, names), record)
        return self._result(
            spec, names, platforms, workdir, cached=False, started=started, contract=contract, digests=digests
        )

    def _build_platform(
        self,
        names: ImageNames,
        platform: str,
        repo_dir: Path,
        contract: ContractOk,
        spec: BuildSpec,
        workdir: Path,
    ) -> dict[str, str]:
        """Build base, learner and aggregator for one platform; returns role -> local image name."""
        suffix = platform_suffix(platform)
        debian = self._ensure_debian(platform, workdir)
        ctx = workdir / "contexts" / f"{names.owner}-{names.repo}-{names.commit[:12]}-{suffix}"
        shutil.rmtree(ctx, ignore_errors=True)
        volumes = self._prepare_context(ctx, platform, contract.requirements, workdir)
        runtime = self._ensure_runtime(debian, platform, ctx, volumes)
        deps = self._ensure_deps(runtime, platform, contract.requirements, ctx, volumes)
        labels = {
            "org.opencontainers.image.source": spec.repo_url,
            "org.opencontainers.image.revision": names.commit,
            "org.flops.flavor": spec.flavor,
        }
        copy_own_packages(ctx / "src")
        _copy_repo(repo_dir, ctx / "repo")
        local = {role: f"{names.ref(role)}-{suffix}" for role in ("base", "learner", "aggregator")}
        self._bud(
            "base",
            cf.base_containerfile(labels | {"org.flops.role": "base"}),
            ctx,
            platform,
            local["base"],
            {"FLOPS_DEPS": deps},
            {},
        )
        (ctx / "build" / cf.IMPORT_CHECK).write_text(CHECK_SCRIPT, encoding="utf-8")
        for role in ("learner", "aggregator"):
            self._bud(
                role,
                # The learner's build proves ModelManager loads; the aggregator shares its base and repo.
                cf.actor_containerfile(role, labels | {"org.flops.role": role}, import_check=role == "learner"),
                ctx,
                platform,
                local[role],
                {"FLOPS_IMAGE_BASE": local["base"]},
                {},
            )
        shutil.rmtree(ctx, ignore_errors=True)
        return local

    # --- platforms and emulation --------------------------------------------------------------------------

    def _check_platforms(self, platforms: tuple[str, ...]) -> None:
        """Fail naming every requested platform this builder can neither run natively nor emulate."""
        native = native_platform()
        missing = [p for p in platforms if not _same_arch(p, native) and not self._emulation_ready(p)]
        if missing:
            raise StepFailed(
                "platform",
                f"cannot build {', '.join(missing)} on this {native} builder: no QEMU user emulation is registered "
                "for it (install qemu-user-static and binfmt-support, and mount binfmt_misc)",
            )

    def _emulation_ready(self, platform: str) -> bool:
        _, arch, _ = parse_platform(platform)
        qemu = QEMU_NAMES.get(arch, arch)
        entry = BINFMT / f"qemu-{qemu}"
        if not (BINFMT / "status").exists():
            # Not mounted by default on these hosts; root can mount it (the registrations follow).
            succeeds("mount", ["-t", "binfmt_misc", "binfmt_misc", str(BINFMT)])
        if not entry.exists() and shutil.which("update-binfmts"):
            succeeds("update-binfmts", ["--enable", f"qemu-{qemu}"])
        try:
            return entry.read_text().splitlines()[0].strip() == "enabled"
        except (OSError, IndexError):
            return False

    # --- the Debian base ----------------------------------------------------------------------------------

    def _ensure_debian(self, platform: str, workdir: Path) -> str:
        """The image the runtime is built FROM for `platform` (a local name, or FLOPS_BASE_IMAGE)."""
        s = self.settings
        if s.base_image:
            return s.base_image
        _, arch, _ = parse_platform(platform)
        local = f"localhost/flops/debian:{s.debian_suite}-{platform_suffix(platform)}"
        remote = shared_ref(s.registry, local)
        if not self._local_image(local):
            with file_lock(s.rootfs_cache / f"{s.debian_suite}-{arch}.lock", timeout_s=s.lock_timeout_s):
                # A builder in a container (the Oakestra builder image) has no debootstrap: the registry's copy.
                if not self._local_image(local) and not self._pull_shared(remote, local, platform):
                    self._import_rootfs(self._rootfs_tar(arch), local, arch)
        if not self._remote_has(remote, platform):
            self._buildah("debian", "pushing the Debian base", ["push", *self._tls(), local, f"docker://{remote}"])
        return local

    def _rootfs_tar(self, arch: str) -> Path:
        """A tarball of ``debootstrap --variant=minbase`` for `arch`, made once per machine (the cache)."""
        s = self.settings
        tar = s.rootfs_cache / f"debian-{s.debian_suite}-{arch}.tar"
        if tar.is_file():
            return tar
        rootfs = s.rootfs_cache / f".debian-{s.debian_suite}-{arch}.tmp"
        shutil.rmtree(rootfs, ignore_errors=True)
        rootfs.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        stream(
            "debootstrap",
            [
                f"--arch={arch}",
                "--variant=minbase",
                f"--include={','.join(DEBIAN_PACKAGES)}",
                s.debian_suite,
                rootfs,
                s.debian_mirror,
            ],
            step="debian",
            what=f"debootstrap of Debian {s.debian_suite} for {arch}",
            on_line=self._line,
            timeout_s=s.debootstrap_timeout_s,
        )
        partial = tar.with_suffix(".tar.tmp")
        stream(
            "tar",
            ["--numeric-owner", "-C", rootfs, "-cf", partial, "."],
            step="debian",
            what="packing the Debian root",
            on_line=self._line,
            timeout_s=s.debootstrap_timeout_s,
        )
        partial.replace(tar)
        shutil.rmtree(rootfs, ignore_errors=True)
        self._progress("debian", f"Debian {s.debian_suite} {arch} made in {time.monotonic() - started:.1f} s")
        return tar

    def _import_rootfs(self, tar: Path, name: str, arch: str) -> None:
        """``buildah from scratch`` + the root tarball + a config, committed as `name` in local storage."""
        what = "importing the Debian base"
        ctr = self._buildah("debian", what, ["from", "--name", f"flops-debian-{arch}-{os.getpid()}", "scratch"])[-1]
        try:
            self._buildah("debian", what, ["add", ctr, tar, "/"])
            config = ["config", "--os", "linux", "--arch", arch, "--cmd", "/bin/bash"]
            config += ["--env", "LANG=C.UTF-8", "--label", "org.flops.role=debian", ctr]
            self._buildah("debian", what, config)
            self._buildah("debian", what, ["commit", "--quiet", ctr, name])
        finally:
            succeeds("buildah", [*self._global(), "rm", ctr])

    # --- the runtime image --------------------------------------------------------------------------------

    def _ensure_runtime(self, debian: str, platform: str, ctx: Path, volumes: dict[str, str]) -> str:
        """The shared runtime image for `platform` in local storage, built when missing."""
        s = self.settings
        foreign = not _same_arch(platform, native_platform())
        identity = {
            "base": debian,
            "base_id": self._image_id(debian),
            "requirements": sorted(s.runtime_requirements),
            "platform": platform,
            "offline": foreign,
            "containerfile": cf.runtime_containerfile(),
        }
        return self._ensure_local("runtime", identity, cf.runtime_containerfile, {"FLOPS_BASE": debian}, ctx, volumes)

    def _ensure_deps(
        self,
        runtime: str,
        platform: str,
        requirements: tuple[str, ...],
        ctx: Path,
        volumes: dict[str, str],
    ) -> str:
        """The repo's dependencies on the runtime for `platform`, in local storage: built when missing."""
        identity = {
            "runtime": runtime,
            "runtime_id": self._image_id(runtime),
            "requirements": sorted(requirements),
            "platform": platform,
            "containerfile": cf.deps_containerfile(),
        }
        return self._ensure_local("deps", identity, cf.deps_containerfile, {"FLOPS_RUNTIME": runtime}, ctx, volumes)

    def _ensure_local(
        self,
        role: str,
        identity: Mapping[str, Any],
        containerfile: Callable[[Mapping[str, str]], str],
        build_args: dict[str, str],
        ctx: Path,
        volumes: dict[str, str],
    ) -> str:
        """``localhost/flops/<role>:<key>-<platform>``, built from `containerfile` unless local storage has it;
        `identity` (what it is built from) makes the key."""
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        platform = str(identity["platform"])
        name = f"localhost/flops/{role}:{key}-{platform_suffix(platform)}"
        remote = shared_ref(self.settings.registry, name)
        lock = self.settings.rootfs_cache / "locks" / f"{role}-{key}.lock"
        with file_lock(lock, timeout_s=self.settings.lock_timeout_s):
            if not self._local_image(name) and not self._pull_shared(remote, name, platform):
                labels = {"org.flops.role": role, f"org.flops.{role}-key": key}
                self._bud(role, containerfile(labels), ctx, platform, name, build_args, volumes)
        if self.settings.share_bases:
            self.share(name, platform)
        return name

    def share(self, local: str, platform: str) -> str:
        """Push the local image ``localhost/flops/<role>:<tag>`` to the registry as ``<registry>/flops/<role>:<tag>``
        unless it is there: what a builder without it (in a container) pulls instead of building."""
        remote = shared_ref(self.settings.registry, local)
        if not self._remote_has(remote, platform):
            self._buildah("push", f"pushing {remote}", ["push", *self._tls(), local, f"docker://{remote}"])
        return remote

    def _pull_shared(self, remote: str, local: str, platform: str) -> bool:
        """Pull ``remote`` (a shared base another builder pushed) and name it ``local``; False when the registry
        lacks it (then it is built here)."""
        if not self._remote_has(remote, platform):
            return False
        what = f"pulling {remote}"
        self._buildah("pull", what, ["pull", "--quiet", *self._tls(), "--platform", platform, f"docker://{remote}"])
        self._buildah("pull", what, ["tag", remote, local])
        self._progress("pull", f"{local} pulled from {remote}")
        return True

    def _image_id(self, name: str) -> str:
        return output("buildah", [*self._global(), "images", "--quiet", "--no-trunc", name]).strip()

    # --- build contexts and pip ---------------------------------------------------------------------------

    def _prepare_context(
        self, ctx: Path, platform: str, requirements: tuple[str, ...], workdir: Path
    ) -> dict[str, str]:
        """Write ``build/`` (requirements, pip.conf, CA, constraints, wheels); returns RUN-step volumes."""
        build = ctx / "build"
        build.mkdir(parents=True)
        runtime = cf.requirements_txt(self.settings.runtime_requirements)
        (build / cf.RUNTIME_REQUIREMENTS).write_text(runtime, encoding="utf-8")
        (build / cf.REPO_REQUIREMENTS).write_text(cf.requirements_txt(requirements), encoding="utf-8")
        _, arch, _ = parse_platform(platform)
        cache = workdir / "cache" / f"pip-{platform_suffix(platform)}"
        cache.mkdir(parents=True, exist_ok=True)
        volumes = {str(cache): cf.PIP_CACHE}
        if _same_arch(platform, native_platform()):
            options, mounts = host_pip_options(host_pip_config(self.settings.host_python), build)
            volumes |= {m: m for m in mounts}
        else:
            wheels = workdir / "cache" / f"wheels-{platform_suffix(platform)}"
            self._download_wheels(wheels, arch, build)
            options = cf.wheelhouse_pip_options(cf.WHEELS_MOUNT)
            volumes[str(wheels)] = cf.WHEELS_MOUNT
        (build / cf.PIP_CONF).write_text(cf.pip_conf(options), encoding="utf-8")
        return volumes

    def _download_wheels(self, wheels: Path, arch: str, build: Path) -> None:
        """The target platform's wheels for the runtime and the repo, downloaded by the host's pip."""
        requirements: list[str | Path] = ["-r", build / cf.RUNTIME_REQUIREMENTS, "-r", build / cf.REPO_REQUIREMENTS]
        s = self.settings
        download_wheels(s.host_python, wheels, arch, s.python_version, requirements, self._line, s.step_timeout_s)

    # --- buildah ------------------------------------------------------------------------------------------

    def _global(self) -> list[str]:
        return ["--storage-driver", self.settings.storage_driver]

    def _tls(self) -> list[str]:
        return [] if self.settings.registry_tls else ["--tls-verify=false"]

    def _buildah(self, step: str, what: str, args: list[str | Path]) -> list[str]:
        lines = stream(
            "buildah",
            [*self._global(), *args],
            step=step,
            what=what,
            on_line=self._line,
            timeout_s=self.settings.step_timeout_s,
        )
        return [ln for ln in lines if ln.strip()] or [""]

    def _bud(
        self,
        role: str,
        text: str,
        ctx: Path,
        platform: str,
        tag: str,
        build_args: dict[str, str],
        volumes: Mapping[str, str],
    ) -> None:
        containerfile = ctx / f"{role}.Containerfile"
        containerfile.write_text(text, encoding="utf-8")
        args: list[str | Path] = [
            "bud",
            "--isolation",
            self.settings.isolation,
            "--platform",
            platform,
            *self._tls(),
        ]
        args += ["--file", containerfile, "--tag", tag]
        for key, value in build_args.items():
            args += ["--build-arg", f"{key}={value}"]
        for source, target in volumes.items():
            args += ["--volume", f"{source}:{target}:{'rw' if target == cf.PIP_CACHE else 'ro'}"]
        started = time.monotonic()
        self._progress(role, f"building the {role} image for {platform}")
        self._buildah(role, f"building the {role} image for {platform}", [*args, ctx])
        self._progress(role, f"{role} image for {platform} built in {time.monotonic() - started:.1f} s")

    def _push_manifest(self, ref: str, per_platform: Mapping[str, str]) -> str:
        """Create the manifest list `ref` from the per-platform images and push it with all of them."""
        what = f"pushing {ref}"
        succeeds("buildah", [*self._global(), "manifest", "rm", ref])
        succeeds("buildah", [*self._global(), "rmi", ref])
        self._buildah("push", what, ["manifest", "create", ref])
        for image in per_platform.values():
            self._buildah("push", what, ["manifest", "add", ref, image])
        self._buildah("push", what, ["manifest", "push", "--all", *self._tls(), ref, f"docker://{ref}"])
        _, repository, tag = _split(ref)
        return self.client().digest(repository, tag) or ""

    def _forget_local(self, names: ImageNames, platforms: tuple[str, ...]) -> None:
        for role in ("aggregator", "learner", "base"):
            succeeds("buildah", [*self._global(), "manifest", "rm", names.ref(role)])
            for platform in platforms:
                succeeds("buildah", [*self._global(), "rmi", f"{names.ref(role)}-{platform_suffix(platform)}"])

    def _local_image(self, name: str) -> bool:
        return succeeds("buildah", [*self._global(), "inspect", "--type", "image", name])

    def _remote_has(self, ref: str, platform: str) -> bool:
        try:
            return self.client().has_image(ref, [platform])
        except OSError:
            return False

    # --- output -------------------------------------------------------------------------------------------

    def _line(self, step: str, line: str) -> None:
        if not line.strip():
            return
        self._log.debug("build output", step=step, line=line)
        if self._on_line is not None:
            self._on_line(step, line)

    def _progress(self, step: str, message: str) -> None:
        self._log.info(message, step=step)
        if self._on_line is not None:
            self._on_line(step, message)

    def _record_path(self, workdir: Path, names: ImageNames) -> Path:
        return workdir / "images" / f"{names.owner}-{names.repo}-{names.commit}.json"

    def _result(
        self,
        spec: BuildSpec,
        names: ImageNames,
        platforms: tuple[str, ...],
        workdir: Path,
        *,
        cached: bool,
        started: float,
        contract: ContractOk | None = None,
        digests: Mapping[str, str] | None = None,
    ) -> BuildResult:
        record = _read_json(self._record_path(workdir, names))  # what the build that pushed them knew
        if contract is not None:
            record = {"dependency_file": contract.dependency_file, "requirements": list(contract.requirements)}
        if digests is None:
            client = self.client()
            digests = {
                role: client.digest(names.repository(role), names.commit) or ""
                for role in ("base", "learner", "aggregator")
            }
        key = hashlib.sha256(json.dumps([names.as_dict(), sorted(platforms), spec.flavor]).encode()).hexdigest()[:20]
        artifact = ImageArtifactRef(
            key=key,
            ref=f"image://{names.registry}/{names.owner}/{names.repo}:{names.commit}",
            images=names.as_dict(),
            digest=digests.get("learner", ""),
            digests=dict(digests),
            repo_url=spec.repo_url,
            commit=names.commit,
            flavor=spec.flavor,
            platforms=platforms,
            dependency_file=record.get("dependency_file", ""),
            requirements=tuple(record.get("requirements", ())),
        )
        warnings = tuple(contract.warnings) if contract is not None else tuple(record.get("warnings", ()))
        return BuildResult(artifact=artifact, cached=cached, warnings=warnings, duration_s=time.monotonic() - started)


def download_wheels(
    python: str,
    wheels: Path,
    arch: str,
    python_version: str,
    requirements: list[str | Path],
    on_line: LineSink,
    timeout_s: float,
) -> None:
    """Wheels of ``requirements`` (pip arguments) for linux/``arch`` and CPython ``python_version`` (the
    image's, not the host's), downloaded by the host's pip into ``wheels``: what an image installs offline."""
    wheels.mkdir(parents=True, exist_ok=True)
    machine = WHEEL_ARCH.get(arch, arch)
    major, minor, _ = _version_tuple(python_version)
    tags = [f"manylinux2014_{machine}", f"linux_{machine}"]
    tags += [f"manylinux_2_{n}_{machine}" for n in range(17, 37)]  # bookworm has glibc 2.36
    args: list[str | Path] = ["-m", "pip", "download", "--only-binary=:all:", "--progress-bar", "off"]
    args += ["--dest", wheels, *[f"--platform={t}" for t in tags]]
    args += ["--python-version", f"{major}.{minor}", "--implementation", "cp", *requirements]
    what = f"downloading linux/{arch} wheels (pip download --only-binary=:all:)"
    stream(python, args, step="wheels", what=what, on_line=on_line, timeout_s=timeout_s)


# --- host pip configuration -----------------------------------------------------------------------------


def host_pip_config(python: str) -> dict[str, str]:
    """This host's effective pip settings (``pip config list``: files, then ``PIP_*`` variables win)."""
    text = output(python, ["-m", "pip", "config", "list"])
    files: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if not sep:
            continue
        section, _, key = name.rpartition(".")
        target = env if section == ":env:" else files
        if section in (":env:", "global", "install", "download"):
            target[key.strip()] = value.strip().strip("'\"")
    return files | env


def host_pip_options(config: Mapping[str, str], build: Path) -> tuple[dict[str, str], list[str]]:
    """pip options for a build on this host's platform, plus the host directories its RUN steps need mounted.

    The CA bundle (pip's ``cert``, else the system bundle: TLS may be intercepted) and constraint files are
    copied into ``build/``; local index and find-links directories are mounted at the same path.
    """
    options: dict[str, str] = {}
    mounts: list[str] = []
    cert = Path(config["cert"]) if config.get("cert") else SYSTEM_CA_BUNDLE
    if cert.is_file():
        shutil.copyfile(cert, build / "ca.crt")
        options["cert"] = f"{cf.BUILD_MOUNT}/ca.crt"
    for key in ("index-url", "extra-index-url", "find-links"):
        kept = []
        for value in config.get(key, "").split():
            path = None if value.startswith(("http://", "https://")) else local_path(value)
            if path is None:
                kept.append(value)
            elif path.exists():
                # A PEP 503 index's files usually sit beside its simple/ directory: mount the parent.
                mount = path.parent if path.name == "simple" else path
                mounts.append(str(mount.resolve()))
                kept.append(value)
        if kept:
            options[key] = " ".join(kept)
    constraints = [Path(c) for c in config.get("constraint", "").split() if Path(c).is_file()]
    if constraints:
        text = "".join(c.read_text(encoding="utf-8") + "\n" for c in constraints)
        (build / "constraints.txt").write_text(text, encoding="utf-8")
        options["constraint"] = f"{cf.BUILD_MOUNT}/constraints.txt"
    for key in PIP_PASSTHROUGH:
        if config.get(key):
            options[key] = config[key]
    return options, sorted(set(mounts))


# --- helpers --------------------------------------------------------------------------------------------


def copy_own_packages(dest: Path) -> None:
    """Our ``flops`` and ``flops_utils`` packages, without caches, for the base image's ``src/``."""
    for name in OWN_PACKAGES:
        shutil.copytree(own_packages_dir() / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def shared_ref(registry: str, local: str) -> str:
    """The registry's name of a local shared image: ``localhost/flops/runtime:<tag>`` ->
    ``<registry>/flops/runtime:<tag>``."""
    return f"{registry}/{local.removeprefix('localhost/')}"


def _copy_repo(repo_dir: Path, dest: Path) -> None:
    shutil.copytree(repo_dir, dest, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc"))


def _same_arch(platform: str, other: str) -> bool:
    return parse_platform(platform)[:2] == parse_platform(other)[:2]


def _split(ref: str) -> tuple[str, str, str]:
    from flops.builder.images import parse_ref

    return parse_ref(ref)


def _version_tuple(version: str) -> tuple[int, int, int]:
    major, minor, micro = ([*(int(p) for p in version.split(".")[:3] if p.isdigit()), 0, 0, 0])[:3]
    return major, minor, micro


def _write_json(path: Path, record: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    tmp.replace(path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
