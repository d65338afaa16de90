"""Names of the images the image builder makes: ``<registry>/<owner>/<repo>/{base,learner,aggregator}:<commit>``.

As in the original FLOps, an ML repo at a commit becomes three images: ``base`` (the repo's dependencies and
our runtime), ``learner`` and ``aggregator`` (base + the repo + an entrypoint). Owner and repo come from the
repo URL (https, ssh, scp-like ``git@host:owner/repo``, ``file://`` or a local path), made registry-safe:
lower case, path components matching the distribution spec's ``[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*``.
Also: parsing a reference back into (registry, repository, tag), and platform strings (``linux/arm64``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

ROLES = ("base", "learner", "aggregator")
_SCP_LIKE = re.compile(r"^(?:[\w.-]+@)?(?P<host>[\w.-]+):(?P<path>(?!//).+)$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class ImageNameError(ValueError):
    """A repo URL, reference or platform that cannot be turned into an image name."""


def component(text: str, fallback: str) -> str:
    """One registry path component: lower case, runs of other characters become one ``-``."""
    lowered = text.lower()
    cleaned = re.sub(r"[^a-z0-9]+", lambda m: "_" if m.group() in ("_", "__") else "-", lowered)
    cleaned = cleaned.strip("-_")
    return cleaned or fallback


def repo_owner_and_name(repo_url: str) -> tuple[str, str]:
    """(owner, repo) of an ML repo URL, registry-safe: ``https://github.com/Acme/Digits.git`` -> (acme, digits).

    The owner is the path segment before the repo name (the last segment's parent for a local path,
    ``local`` when there is none).
    """
    url = repo_url.strip().rstrip("/")
    if not url:
        raise ImageNameError("empty repo URL")
    scp = _SCP_LIKE.match(url) if "://" not in url else None
    if scp and not url.startswith(("/", ".")):
        path = scp["path"]
    elif "://" in url:
        path = urlsplit(url).path
    else:
        path = url
    segments = [s for s in path.split("/") if s and s not in (".", "..")]
    if not segments:
        raise ImageNameError(f"repo URL {repo_url!r} names no repository")
    name = segments[-1].removesuffix(".git")
    owner = segments[-2] if len(segments) > 1 else "local"
    return component(owner, "local"), component(name, "repo")


@dataclass(frozen=True)
class ImageNames:
    """The three image references of one (repo, commit) in one registry."""

    registry: str  # host[:port], no scheme
    owner: str
    repo: str
    commit: str

    def repository(self, role: str) -> str:
        """The repository path inside the registry, e.g. ``acme/digits/learner``."""
        if role not in ROLES:
            raise ImageNameError(f"unknown image role {role!r}; one of {', '.join(ROLES)}")
        return f"{self.owner}/{self.repo}/{role}"

    def ref(self, role: str) -> str:
        return f"{self.registry}/{self.repository(role)}:{self.commit}"

    @property
    def base(self) -> str:
        return self.ref("base")

    @property
    def learner(self) -> str:
        return self.ref("learner")

    @property
    def aggregator(self) -> str:
        return self.ref("aggregator")

    def as_dict(self) -> dict[str, str]:
        return {role: self.ref(role) for role in ROLES}


def image_names(registry: str, repo_url: str, commit: str) -> ImageNames:
    """The image references for ``repo_url`` at ``commit`` in ``registry`` (``host:port``)."""
    registry = registry_host(registry)
    if not _TAG.match(commit):
        raise ImageNameError(f"commit {commit!r} is not a valid image tag")
    owner, repo = repo_owner_and_name(repo_url)
    return ImageNames(registry, owner, repo, commit.lower())


def registry_host(registry: str) -> str:
    """``host[:port]`` of a registry given with or without a scheme (``http://127.0.0.1:5000/`` too)."""
    text = registry.strip()
    if "://" in text:
        text = urlsplit(text).netloc
    text = text.rstrip("/")
    if not text or "/" in text or text.endswith(":"):
        raise ImageNameError(f"registry {registry!r} is not host[:port]")
    return text.lower()


def parse_ref(ref: str) -> tuple[str, str, str]:
    """(registry, repository, tag) of ``host:port/path/name:tag``; the tag defaults to ``latest``.

    A digest reference (``…@sha256:…``) keeps the digest as its tag.
    """
    text = ref.removeprefix("docker://")
    registry, sep, rest = text.partition("/")
    if not sep or not rest or not ("." in registry or ":" in registry or registry == "localhost"):
        raise ImageNameError(f"image reference {ref!r} names no registry host")
    if "@" in rest:
        repository, _, tag = rest.partition("@")
    else:
        last = rest.rsplit("/", 1)[-1]
        repository, tag = rest.rsplit(":", 1) if ":" in last else (rest, "latest")
    if not repository:
        raise ImageNameError(f"image reference {ref!r} names no repository")
    return registry, repository, tag


def parse_platform(platform: str) -> tuple[str, str, str]:
    """(os, architecture, variant) of ``linux/arm64`` or ``linux/arm64/v8``; the variant may be empty."""
    parts = platform.strip().lower().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ImageNameError(f"platform {platform!r} is not os/arch[/variant]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else ""


def platform_suffix(platform: str) -> str:
    """A tag-safe suffix for one platform's image: ``linux/arm64`` -> ``linux-arm64``."""
    return "-".join(p for p in parse_platform(platform) if p)
