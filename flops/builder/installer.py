"""Create Python environments and install requirements into them, with uv when present, pip otherwise.

uv is fast and keeps a content-addressed cache we point at the builder's data dir; every install is
tried `--offline` first, so a builder whose cache already holds the packages needs no network at all,
and goes online only when something is missing. Without uv we fall back to `python -m venv` + pip.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import structlog

from flops.builder.process import CommandFailed, run


def find_uv() -> str | None:
    """The uv binary: on PATH, beside this interpreter (an unactivated venv), or from the `uv` package."""
    found = shutil.which("uv") or shutil.which("uv", path=str(Path(sys.executable).parent))
    if found:
        return found
    try:
        from uv import find_uv_bin  # the PyPI `uv` package ships the binary

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        return None


@dataclass(frozen=True)
class Installer:
    """Makes environments from `python` and installs into them; `uv=None` means the pip fallback."""

    python: str
    uv_cache_dir: Path
    pip_cache_dir: Path
    uv: str | None
    timeout_s: float = 1200.0
    offline_first: bool = True

    @property
    def mode(self) -> str:
        return "uv" if self.uv else "pip"

    def _env(self) -> dict[str, str]:
        return {
            "UV_CACHE_DIR": str(self.uv_cache_dir),
            "PIP_CACHE_DIR": str(self.pip_cache_dir),
            "UV_PYTHON_DOWNLOADS": "never",  # use the interpreter we name, never fetch one
            "UV_NO_PROGRESS": "1",
            "NO_COLOR": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_INPUT": "1",
        }

    def create_venv(self, path: Path, *, with_pip: bool) -> Path:
        """A fresh environment at `path`; returns its interpreter. `with_pip` matters only without uv."""
        if self.uv:
            args = ["venv", "--quiet", "--no-project", "--python", self.python, path]
            run(self.uv, args, timeout_s=120, env=self._env())
        else:
            args = ["-m", "venv", *([] if with_pip else ["--without-pip"]), path]
            run(self.python, args, timeout_s=300, env=self._env())
        return path / "bin" / "python"

    def install(self, env_python: Path, args: list[str], *, constraints: Path | None = None) -> str:
        """Install `args` (requirements, `-r file`) into the environment of `env_python`.

        Raises `CommandFailed` with the installer's output when something does not resolve.
        """
        log = structlog.get_logger(__name__).bind(env=str(env_python.parent.parent), installer=self.mode)
        if not self.uv:
            # Run pip *inside* the target env: it then sees packages reachable through .pth files as
            # installed, and refuses to uninstall what lives outside the env.
            pip_args = ["-m", "pip", "install", "--no-input", *args]
            if constraints:
                pip_args += ["-c", str(constraints)]
            return run(env_python, pip_args, timeout_s=self.timeout_s, env=self._env())
        # Compile bytecode at install time (pip does too): otherwise every learner start and every
        # import check recompiles numpy/sklearn/flwr, seconds each time.
        uv_args = ["pip", "install", "--compile-bytecode", "--python", str(env_python), *args]
        if constraints:
            uv_args += ["--constraint", str(constraints)]
        if self.offline_first:
            try:
                return run(self.uv, [*uv_args, "--offline"], timeout_s=self.timeout_s, env=self._env())
            except CommandFailed as exc:
                if exc.timed_out:
                    raise
                log.debug("offline install incomplete, going online", tail=exc.output[-300:])
        return run(self.uv, uv_args, timeout_s=self.timeout_s, env=self._env())


def default_uv_cache(workdir: Path) -> Path:
    """uv's cache: the one the operator already configured (`UV_CACHE_DIR`), else under the data dir."""
    configured = os.environ.get("UV_CACHE_DIR")
    return Path(configured) if configured else workdir / "cache" / "uv"
