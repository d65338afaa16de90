"""`EnvBuilder`: turn an ML repo at a pinned commit into an isolated, import-checked Python environment.

One environment per key (repo, commit, platforms, flavor, runtime base). It extends the shared runtime
base through a `.pth` file and installs only the repo's requirements the base does not already satisfy
(with the base's versions as constraints, so shared dependencies are not silently upgraded). The
finished artifact is recorded as `artifact.json`; a later build of the same key returns it at once
(`cached=True`). A per-key file lock keeps concurrent builds of one key from corrupting each other.

Directory layout under the builder's workdir:
    repos/<repo>-<hash>/<commit>/   checkouts        base/<key>/      runtime base envs
    envs/<key>/venv, artifact.json  project envs     locks/, cache/   locks, uv/pip caches
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from flops.builder.contract import ContractViolation, check_contract
from flops.builder.import_check import check_model_manager
from flops.builder.installer import Installer, default_uv_cache, find_uv
from flops.builder.locking import file_lock
from flops.builder.process import CommandFailed, StepFailed, tail
from flops.builder.repo import checkout, resolve_commit
from flops.builder.result import ArtifactRef, BuildFailure, BuildResult, BuildSpec
from flops.builder.runtime_base import (
    DEFAULT_RUNTIME_REQUIREMENTS,
    RuntimeBase,
    ensure_runtime_base,
    site_packages,
)

ARTIFACT = "artifact.json"
BASE_PTH = "_flops_runtime_base.pth"


@dataclass(frozen=True)
class BuilderSettings:
    """Knobs of the env builder; built in `main()` and passed in (no module-level configuration)."""

    python: str = field(default_factory=lambda: sys.executable)  # interpreter the envs are made from
    runtime_requirements: tuple[str, ...] = DEFAULT_RUNTIME_REQUIREMENTS
    uv_cache_dir: Path | None = None  # None: $UV_CACHE_DIR, else <workdir>/cache/uv
    prefer_uv: bool = True
    offline_first: bool = True
    git_timeout_s: float = 300.0
    install_timeout_s: float = 1200.0
    import_check_timeout_s: float = 180.0
    lock_timeout_s: float = 3600.0


class EnvBuilder:
    """The Python-environment backend of `flops.builder.Builder`."""

    def __init__(self, settings: BuilderSettings | None = None) -> None:
        self.settings = settings or BuilderSettings()
        self._python_version: str | None = None

    def build(self, spec: BuildSpec | Mapping[str, Any], workdir: Path) -> BuildResult | BuildFailure:
        """Build (or fetch from the cache) the environment for `spec`; never raises for a bad repo."""
        started = time.monotonic()
        spec = spec if isinstance(spec, BuildSpec) else BuildSpec.model_validate(spec)
        log = structlog.get_logger(__name__).bind(repo_url=spec.repo_url, flavor=spec.flavor)
        try:
            result = self._build(spec, Path(workdir), started, log)
        except StepFailed as exc:
            failure = BuildFailure(
                step=exc.step, reason=exc.reason, log_tail=exc.log_tail, duration_s=time.monotonic() - started
            )
            log.warning("build failed", step=exc.step, reason=exc.reason, duration_s=failure.duration_s)
            return failure
        log.info(
            "build succeeded",
            build_key=result.artifact.key,
            commit=result.artifact.commit,
            cached=result.cached,
            warnings=len(result.warnings),
            duration_s=round(result.duration_s, 3),
        )
        return result

    def build_key(self, spec: BuildSpec, commit: str) -> str:
        """Cache identity of a build: the spec's (repo, commit, platforms, flavor) plus the runtime base."""
        material = json.dumps(
            {
                "repo_url": spec.repo_url.rstrip("/"),
                "commit": commit,
                "flavor": spec.flavor,
                "platforms": sorted(spec.platforms),
                "python": self.python_version(),
                "runtime": sorted(self.settings.runtime_requirements),
            },
            sort_keys=True,
        )
        return hashlib.sha256(material.encode()).hexdigest()[:20]

    def python_version(self) -> str:
        """Full version of the interpreter environments are made from (asked once)."""
        if self._python_version is None:
            if Path(self.settings.python) == Path(sys.executable):
                self._python_version = platform.python_version()
            else:
                out = subprocess.run(
                    [self.settings.python, "-c", "import platform; print(platform.python_version())"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=True,
                )
                self._python_version = out.stdout.strip()
        return self._python_version

    def _installer(self, workdir: Path) -> Installer:
        uv = find_uv() if self.settings.prefer_uv else None
        return Installer(
            python=self.settings.python,
            uv_cache_dir=self.settings.uv_cache_dir or default_uv_cache(workdir),
            pip_cache_dir=workdir / "cache" / "pip",
            uv=uv,
            timeout_s=self.settings.install_timeout_s,
            offline_first=self.settings.offline_first,
        )

    def _build(self, spec: BuildSpec, workdir: Path, started: float, log: Any) -> BuildResult:
        s = self.settings
        commit = resolve_commit(spec.repo_url, spec.commit, timeout_s=s.git_timeout_s)
        key = self.build_key(spec, commit)
        log = log.bind(build_key=key, commit=commit)
        home = workdir / "envs" / key
        cached = _read_artifact(home)
        if cached is not None:
            return _result(cached, cached=True, started=started)
        with file_lock(workdir / "locks" / f"env-{key}.lock", timeout_s=s.lock_timeout_s):
            cached = _read_artifact(home)  # a concurrent build of this key may have finished meanwhile
            if cached is not None:
                return _result(cached, cached=True, started=started)
            repo_dir = checkout(spec.repo_url, commit, workdir / "repos", timeout_s=s.git_timeout_s)
            version = self.python_version()
            contract = check_contract(repo_dir, _version_tuple(version))
            if isinstance(contract, ContractViolation):
                raise StepFailed("contract", contract.reason)
            installer = self._installer(workdir)
            base = ensure_runtime_base(
                workdir / "base",
                installer,
                python_version=version,
                requirements=s.runtime_requirements,
                lock_timeout_s=s.lock_timeout_s,
            )
            shutil.rmtree(home, ignore_errors=True)  # leftovers of a crashed build of this key
            home.mkdir(parents=True)
            try:
                python, installed = _make_project_env(home, base, installer, contract.requirements, version)
                log.debug("project env installed", installed=installed)
                check = check_model_manager(python, repo_dir, timeout_s=s.import_check_timeout_s)
            except StepFailed:
                shutil.rmtree(home, ignore_errors=True)  # a failed env is never reused: free its disk
                raise
            artifact = ArtifactRef(
                key=key,
                python=str(python),
                repo_dir=str(repo_dir),
                repo_url=spec.repo_url,
                commit=commit,
                flavor=spec.flavor,
                platforms=spec.platforms,
                dependency_file=contract.dependency_file,
                requirements=contract.requirements,
                fit_model_takes_config=bool(check.get("fit_config")),
            )
            record = {
                "artifact": artifact.model_dump(mode="json"),
                "warnings": list(contract.warnings),
                "installed": installed,
                "runtime_base": base.key,
                "import_check": check,
                "built_in_s": round(time.monotonic() - started, 3),
            }
            tmp = home / (ARTIFACT + ".tmp")
            tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
            tmp.replace(home / ARTIFACT)  # the artifact exists only once complete
        return BuildResult(
            artifact=artifact, cached=False, warnings=contract.warnings, duration_s=time.monotonic() - started
        )


def _make_project_env(
    home: Path, base: RuntimeBase, installer: Installer, requirements: tuple[str, ...], version: str
) -> tuple[Path, list[str]]:
    """Create the project env on top of `base`; returns its python and the requirements it installed."""
    try:
        python = installer.create_venv(home / "venv", with_pip=False)
        # `import` lines in a .pth run at start-up; addsitedir also processes the base's own .pth files
        # (our packages, editable installs), which a plain path line would not.
        (site_packages(python) / BASE_PTH).write_text(
            f"import site; site.addsitedir({str(base.site_packages)!r})\n", encoding="utf-8"
        )
    except CommandFailed as exc:
        raise StepFailed("environment", "creating the project environment failed", tail(exc.output)) from exc
    base_versions = _installed_versions(base.site_packages)
    missing = [r for r in requirements if not _satisfied(r, base_versions, version)]
    if not missing:
        return python, []
    (home / "requirements.txt").write_text("\n".join(missing) + "\n", encoding="utf-8")
    constraints = None
    if installer.uv:
        # uv does not see packages behind a .pth; pin shared dependencies to the base's versions so
        # a new package cannot shadow (e.g.) the numpy that scikit-learn in the base was built for.
        overridden = {_name(r) for r in missing} - {None}
        constraints = home / "constraints.txt"
        constraints.write_text(
            "".join(f"{n}=={v}\n" for n, v in sorted(base_versions.items()) if n not in overridden),
            encoding="utf-8",
        )
    try:
        installer.install(python, ["-r", str(home / "requirements.txt")], constraints=constraints)
    except CommandFailed as exc:
        if exc.timed_out:
            reason = f"installing {', '.join(missing)} timed out"
            raise StepFailed("install", reason, tail(exc.output)) from exc
        raise StepFailed(
            "install", f"requirements did not resolve: {_resolution_error(exc.output)}", tail(exc.output)
        ) from exc
    return python, missing


def _installed_versions(site_dir: Path) -> dict[str, str]:
    return {
        canonicalize_name(d.metadata["Name"]): d.version
        for d in importlib.metadata.distributions(path=[str(site_dir)])
        if d.metadata["Name"]
    }


def _name(line: str) -> str | None:
    try:
        return canonicalize_name(Requirement(line).name)
    except InvalidRequirement:
        return None


def _satisfied(line: str, installed: dict[str, str], version: str) -> bool:
    """Whether the base already satisfies requirement `line` (options, URLs and extras go to the
    installer: only it can judge those)."""
    try:
        req = Requirement(line)
    except InvalidRequirement:
        return False
    if req.url or req.extras:
        return False
    env = {"python_version": ".".join(version.split(".")[:2]), "python_full_version": version}
    if req.marker is not None and not req.marker.evaluate(env):
        return True  # not for this interpreter: nothing to install
    have = installed.get(canonicalize_name(req.name))
    return have is not None and req.specifier.contains(have, prereleases=True)


def _resolution_error(output: str) -> str:
    """The lines of uv/pip output that say what did not resolve, joined into one sentence."""
    keys = ("error", "because", "no matching distribution", "not found", "unsatisfiable")
    # uv decorates its explanation with box-drawing glyphs; strip them so the reason reads as text.
    glyphs = " |\u00d7\u2570\u2500\u25b6"
    lines = [ln.strip(glyphs) for ln in output.splitlines() if any(k in ln.lower() for k in keys)]
    text = " ".join(ln for ln in lines if ln) or tail(output, lines=3)
    return text[:800]


def _version_tuple(version: str) -> tuple[int, int, int]:
    major, minor, micro = ([*(int(p) for p in version.split(".")[:3] if p.isdigit()), 0, 0, 0])[:3]
    return major, minor, micro


def _read_artifact(home: Path) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads((home / ARTIFACT).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    art = record.get("artifact", {})
    if not Path(art.get("python", "")).exists() or not Path(art.get("repo_dir", "")).is_dir():
        return None  # someone pruned the env or checkout: rebuild rather than hand out a dead ref
    return record


def _result(record: dict[str, Any], *, cached: bool, started: float) -> BuildResult:
    return BuildResult(
        artifact=ArtifactRef.model_validate(record["artifact"]),
        cached=cached,
        warnings=tuple(record.get("warnings", ())),
        duration_s=time.monotonic() - started,
    )
