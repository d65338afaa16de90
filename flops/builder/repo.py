"""Resolve an ML repository's commit and check it out, pinned, into the builder's cache.

Handles whatever `git` handles: https and ssh URLs, `file://` URLs and local paths. Every git call
has a timeout and never waits for a password prompt; a checkout is prepared in a temporary directory
and renamed into place only once it is verified, so a crash or a concurrent build never leaves a
half-written checkout that a later build would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path

import structlog

from flops.builder.process import CommandFailed, StepFailed, run, tail

FULL_SHA = re.compile(r"^[0-9a-fA-F]{40}$")
HEX_PREFIX = re.compile(r"^[0-9a-fA-F]{4,39}$")


class RepoError(StepFailed):
    """The repository or commit cannot be reached or does not exist."""

    def __init__(self, reason: str, log_tail: str = "") -> None:
        super().__init__("repo", reason, log_tail)


def git_env() -> dict[str, str]:
    """Environment that makes git fail instead of waiting for a human (prompts, host-key questions)."""
    env = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true", "LC_ALL": "C"}
    if "GIT_SSH_COMMAND" not in os.environ:
        env["GIT_SSH_COMMAND"] = "ssh -o BatchMode=yes -o ConnectTimeout=20"
    return env


def _git(args: list[str | Path], *, timeout_s: float, cwd: Path | None = None) -> str:
    git = shutil.which("git")
    if git is None:
        raise RepoError("git is not installed on this builder")
    return run(git, args, timeout_s=timeout_s, cwd=cwd, env=git_env())


def git_message(output: str, limit: int = 300) -> str:
    """git's own words from a failed call, trimmed for a one-line reason: its fatal/error/remote lines
    ("repository not found", "Could not resolve host"), else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    said = [line for line in lines if line.lower().startswith(("fatal:", "error:", "remote:"))] or lines[-1:]
    text = "; ".join(said)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _failed(what: str, exc: CommandFailed) -> RepoError:
    """A RepoError whose reason says what failed and, after a colon, what git said about it."""
    said = "" if exc.timed_out else git_message(exc.output)
    reason = f"{what} {'timed out' if exc.timed_out else 'failed'}" + (f": {said}" if said else "")
    return RepoError(reason, tail(exc.output))


def local_path(url: str) -> Path | None:
    """The directory a `file://` URL or plain path names, or None for a remote URL."""
    if url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    if "://" in url or re.match(r"^[\w.-]+@[\w.-]+:", url):  # scheme URL or scp-like ssh
        return None
    return Path(url)


def resolve_commit(url: str, ref: str | None = None, *, timeout_s: float = 60.0) -> str:
    """The full commit sha that `ref` (branch, tag, sha; None = HEAD of the default branch) names."""
    if ref is not None and FULL_SHA.match(ref):
        return ref.lower()
    log = structlog.get_logger(__name__).bind(repo_url=url, ref=ref)
    path = local_path(url)
    try:
        if path is not None:
            # A local repo can answer anything rev-parse understands, including abbreviated shas.
            out = _git(
                ["-C", path, "rev-parse", "--verify", "--end-of-options", f"{ref or 'HEAD'}^{{commit}}"],
                timeout_s=timeout_s,
            )
            sha = out.strip().splitlines()[-1]
        else:
            sha = _resolve_remote(url, ref, timeout_s=timeout_s)
    except CommandFailed as exc:
        raise _failed(f"resolving {ref or 'HEAD'} in {url}", exc) from exc
    log.debug("commit resolved", commit=sha)
    return sha


def _resolve_remote(url: str, ref: str | None, *, timeout_s: float) -> str:
    out = _git(["ls-remote", "--", url, *([ref] if ref else ["HEAD"])], timeout_s=timeout_s)
    refs: dict[str, str] = {}
    for line in out.splitlines():
        sha, _, name = line.partition("\t")
        if FULL_SHA.match(sha):
            refs[name.strip()] = sha.lower()
    if ref is None:
        if "HEAD" in refs:
            return refs["HEAD"]
        raise RepoError(f"{url} has no HEAD (empty repository?)", tail(out))
    # Prefer the peeled commit of an annotated tag over the tag object itself.
    for name in (f"refs/heads/{ref}", f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}", ref):
        if name in refs:
            return refs[name]
    if HEX_PREFIX.match(ref):
        raise RepoError(f"abbreviated commit {ref!r} cannot be resolved remotely; pin the full sha")
    raise RepoError(f"{url} has no branch or tag named {ref!r}", tail(out))


def checkout_dir(cache_dir: Path, url: str, commit: str) -> Path:
    """Where the checkout of (url, commit) lives in the cache."""
    slug = re.sub(r"[^\w.-]+", "-", url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git"))[:40] or "repo"
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return cache_dir / f"{slug}-{digest}" / commit


def checkout(url: str, commit: str, cache_dir: Path, *, timeout_s: float = 300.0) -> Path:
    """A working tree of `url` at `commit` (a full sha) under `cache_dir`, reused when already there."""
    if not FULL_SHA.match(commit):
        raise RepoError(f"checkout needs a full commit sha, got {commit!r}")
    dest = checkout_dir(cache_dir, url, commit)
    if (dest / ".git").is_dir():
        return dest
    log = structlog.get_logger(__name__).bind(repo_url=url, commit=commit)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{commit}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        _fetch_into(tmp, url, commit, timeout_s=timeout_s)
        head = _git(["-C", tmp, "rev-parse", "HEAD"], timeout_s=30).strip()
        if head != commit:
            raise RepoError(f"checked out {head} but {commit} was asked for")
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / ".git").is_dir():  # not a concurrent builder winning the race: a real error
                raise
    except CommandFailed as exc:
        raise _failed(f"fetching commit {commit} from {url}", exc) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    log.info("repository checked out", path=str(dest))
    return dest


def _fetch_into(tmp: Path, url: str, commit: str, *, timeout_s: float) -> None:
    _git(["init", "-q", tmp], timeout_s=30)
    _git(["-C", tmp, "remote", "add", "origin", url], timeout_s=30)
    try:
        # Shallow fetch of just that commit: most servers (GitHub, GitLab, local) allow it.
        _git(["-C", tmp, "fetch", "-q", "--depth", "1", "origin", commit], timeout_s=timeout_s)
    except CommandFailed as exc:
        if exc.timed_out:
            raise
        # Servers that refuse a sha in `want` still serve their refs: fetch them all.
        _git(
            ["-C", tmp, "fetch", "-q", "--tags", "origin", "+refs/heads/*:refs/remotes/origin/*"],
            timeout_s=timeout_s,
        )
        _git(["-C", tmp, "-c", "advice.detachedHead=false", "checkout", "-q", commit], timeout_s=60)
        return
    _git(["-C", tmp, "-c", "advice.detachedHead=false", "checkout", "-q", "FETCH_HEAD"], timeout_s=60)
