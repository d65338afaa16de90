"""Resolving and checking out repos: local paths, file:// URLs, branches, shas, and failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from flops.builder.repo import RepoError, checkout, resolve_commit
from tests.builder.conftest import GitRepo, git


def test_resolve_head_branch_and_short_sha(make_repo: GitRepo) -> None:
    _, old = make_repo({"a": "1"})
    repo, head = make_repo({"a": "2"})

    for url in (str(repo), f"file://{repo}"):
        assert resolve_commit(url) == head
        assert resolve_commit(url, "main") == head
        assert resolve_commit(url, old[:10]) == old
        assert resolve_commit(url, old) == old


def test_unknown_repo_or_ref_is_a_repo_error(make_repo: GitRepo, tmp_path: Path) -> None:
    repo, _ = make_repo({"a": "1"})

    with pytest.raises(RepoError, match="resolving"):
        resolve_commit(f"file://{tmp_path / 'nowhere'}")
    with pytest.raises(RepoError):
        resolve_commit(str(repo), "no-such-branch")


def test_resolve_failure_reason_carries_gits_own_message(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(RepoError) as caught:
        resolve_commit(str(tmp_path / "plain"))
    # The reason (what the project's failure shows) names git's error, not just "failed".
    assert "not a git repository" in caught.value.reason
    assert len(caught.value.reason) < 1000


def test_checkout_is_pinned_reused_and_leaves_no_temp_dirs(make_repo: GitRepo, tmp_path: Path) -> None:
    _, old = make_repo({"a": "old"})
    repo, _ = make_repo({"a": "new"})
    cache = tmp_path / "cache"

    first = checkout(f"file://{repo}", old, cache)
    again = checkout(f"file://{repo}", old, cache)

    assert first == again
    assert (first / "a").read_text() == "old"
    assert git(first, "rev-parse", "HEAD") == old
    assert [p.name for p in first.parent.iterdir()] == [old]


def test_checkout_of_a_missing_commit_fails(make_repo: GitRepo, tmp_path: Path) -> None:
    repo, _ = make_repo({"a": "1"})

    with pytest.raises(RepoError, match="fetching commit"):
        checkout(str(repo), "0" * 40, tmp_path / "cache")
