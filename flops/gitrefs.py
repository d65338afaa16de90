"""Resolve a git repository reference to a full commit sha, with a deadline (used by preparation)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

FULL_SHA = re.compile(r"^[0-9a-f]{40}$")


class ResolveError(Exception):
    pass


def resolve_commit(url: str, ref: str | None = None, *, timeout: float = 30.0) -> str:
    """The commit ``ref`` (default: HEAD) of ``url`` points at, via ``git ls-remote``."""
    if ref and FULL_SHA.match(ref):
        return ref
    target = str(Path(url).resolve()) if url.startswith(("/", "./", "../")) else url
    try:
        proc = subprocess.run(
            ["git", "ls-remote", target, ref or "HEAD"],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"GIT_TERMINAL_PROMPT": "0", "PATH": "/usr/bin:/bin:/usr/local/bin"},
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ResolveError(f"git ls-remote did not answer within {timeout:g} s") from None
    except FileNotFoundError:
        raise ResolveError("git is not installed") from None
    if proc.returncode != 0:
        raise ResolveError((proc.stderr.strip().splitlines() or ["git ls-remote failed"])[-1])
    for line in proc.stdout.splitlines():
        sha, _, name = line.partition("\t")
        if FULL_SHA.match(sha) and (ref is None or name in {ref, f"refs/heads/{ref}", f"refs/tags/{ref}", "HEAD"}):
            return sha
    # A short sha is no ref ls-remote knows: accept it only for local repos where rev-parse can expand it.
    if ref and Path(target).exists():
        rev = subprocess.run(
            ["git", "-C", target, "rev-parse", "--verify", f"{ref}^{{commit}}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if rev.returncode == 0:
            return rev.stdout.strip()
    raise ResolveError(f"no ref {ref or 'HEAD'} in {url}")
