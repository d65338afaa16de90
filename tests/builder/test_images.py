"""Image names from repo URLs, reference parsing and platform strings: pure functions, table-driven."""

from __future__ import annotations

import re

import pytest

from flops.builder.images import (
    ImageNameError,
    image_names,
    parse_platform,
    parse_ref,
    platform_suffix,
    registry_host,
    repo_owner_and_name,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# The distribution spec's path component grammar.
COMPONENT = re.compile(r"^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*$")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://github.com/oakestra/flops-examples.git", ("oakestra", "flops-examples")),
        ("https://github.com/Oakestra/MNIST_Sklearn/", ("oakestra", "mnist_sklearn")),
        ("https://gitlab.example.com/group/sub/Repo.git", ("sub", "repo")),
        ("ssh://git@github.com/Acme/Digits.git", ("acme", "digits")),
        ("git@github.com:Acme/Digits.git", ("acme", "digits")),
        ("file:///tmp/pytest-1/work/digits_sklearn", ("work", "digits_sklearn")),
        ("/srv/repos/My Repo!", ("repos", "my-repo")),
        ("relative-repo", ("local", "relative-repo")),
        ("https://host/a/--Weird..Name__.git", ("a", "weird-name")),
        ("https://host/a/x___y", ("a", "x-y")),
    ],
)
def test_owner_and_repo_come_from_the_url_registry_safe(url: str, expected: tuple[str, str]) -> None:
    owner, repo = repo_owner_and_name(url)
    assert (owner, repo) == expected
    assert COMPONENT.match(owner) and COMPONENT.match(repo)


def test_image_names_follow_the_original_layout() -> None:
    names = image_names("127.0.0.1:5000", "https://github.com/Acme/Digits.git", COMMIT.upper())
    assert names.base == f"127.0.0.1:5000/acme/digits/base:{COMMIT}"
    assert names.learner == f"127.0.0.1:5000/acme/digits/learner:{COMMIT}"
    assert names.aggregator == f"127.0.0.1:5000/acme/digits/aggregator:{COMMIT}"
    assert names.as_dict() == {"base": names.base, "learner": names.learner, "aggregator": names.aggregator}
    assert names.repository("learner") == "acme/digits/learner"


@pytest.mark.parametrize(
    ("given", "host"),
    [("127.0.0.1:5000", "127.0.0.1:5000"), ("http://Registry.local:5000/", "registry.local:5000")],
)
def test_registry_is_host_and_port(given: str, host: str) -> None:
    assert registry_host(given) == host


@pytest.mark.parametrize("bad", ["", "http://", "host:5000/path"])
def test_a_registry_with_a_path_is_refused(bad: str) -> None:
    with pytest.raises(ImageNameError):
        registry_host(bad)


@pytest.mark.parametrize("bad", ["", "/", "https://host/"])
def test_a_url_without_a_repository_is_refused(bad: str) -> None:
    with pytest.raises(ImageNameError):
        repo_owner_and_name(bad)


def test_a_commit_that_is_no_tag_is_refused() -> None:
    with pytest.raises(ImageNameError):
        image_names("127.0.0.1:5000", "https://h/o/r", "not a tag")


@pytest.mark.parametrize(
    ("ref", "parts"),
    [
        ("127.0.0.1:5000/acme/digits/learner:abc", ("127.0.0.1:5000", "acme/digits/learner", "abc")),
        ("docker://localhost/flops/debian", ("localhost", "flops/debian", "latest")),
        ("reg.example.com/a/b@sha256:00ff", ("reg.example.com", "a/b", "sha256:00ff")),
    ],
)
def test_parse_ref(ref: str, parts: tuple[str, str, str]) -> None:
    assert parse_ref(ref) == parts


@pytest.mark.parametrize("bad", ["debian:bookworm", "acme/digits:1", "127.0.0.1:5000/"])
def test_a_ref_without_a_registry_is_refused(bad: str) -> None:
    with pytest.raises(ImageNameError):
        parse_ref(bad)


def test_platforms() -> None:
    assert parse_platform("linux/arm64") == ("linux", "arm64", "")
    assert parse_platform("Linux/ARM64/v8") == ("linux", "arm64", "v8")
    assert platform_suffix("linux/amd64") == "linux-amd64"
    with pytest.raises(ImageNameError):
        parse_platform("arm64")
