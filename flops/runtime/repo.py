"""Import an ML repository's ``ModelManager`` from its directory (``model_manager.py`` at the root).

The repository root goes on ``sys.path`` (so ``model_manager`` / ``data_manager`` import each other
as top-level modules) and so does its parent (so repositories that import themselves by package
name, as some original FLOps repos do, keep working).
"""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path
from typing import Any

from flops_utils.ml_repo_templates import ModelManagerTemplate


class RepoLoadError(RuntimeError):
    """The repository could not be imported or has no usable ``ModelManager``; ``tail`` has the traceback."""

    def __init__(self, repo: Path, tail: str) -> None:
        super().__init__(f"cannot load ModelManager from {repo}:\n{tail}")
        self.repo = repo
        self.tail = tail


def traceback_tail(exc: BaseException, *, lines: int = 15) -> str:
    """The last ``lines`` lines of ``exc``'s formatted traceback."""
    text = "".join(traceback.format_exception(exc)).rstrip("\n").splitlines()
    return "\n".join(text[-lines:])


def _put_on_path(repo: Path) -> None:
    for entry in (str(repo.parent), str(repo)):
        if entry not in sys.path:
            sys.path.insert(0, entry)


def new_model_manager(repo: Path) -> Any:
    """Import ``model_manager.ModelManager`` from ``repo`` and return a new instance."""
    repo = repo.resolve()
    if not (repo / "model_manager.py").is_file():
        raise RepoLoadError(repo, f"{repo} has no model_manager.py at its root")
    _put_on_path(repo)
    try:
        module = importlib.import_module("model_manager")
        manager = module.ModelManager()
    except Exception as exc:
        raise RepoLoadError(repo, traceback_tail(exc)) from exc
    if not isinstance(manager, ModelManagerTemplate):
        for name in ("set_model_data", "get_model_parameters", "set_model_parameters", "fit_model"):
            if not callable(getattr(manager, name, None)):
                raise RepoLoadError(repo, f"ModelManager has no method {name}()")
    return manager
