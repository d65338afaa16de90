"""Check that a checked-out ML repo follows the FLOps repo contract and extract its pip requirements.

The contract (compatible with the original FLOps): `model_manager.py` must exist, `data_manager.py` is
expected, and dependencies come from `requirements.txt` or a conda `conda.yaml` whose `- pip:` list holds
the pip-installable packages. What we cannot honour in a plain Python environment (a `python=` pin that
differs from the runtime, `pip` itself, conda-only packages) is a warning in the build report, not a
failure: the original repos routinely carry them.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

MODEL_MANAGER = "model_manager.py"
DATA_MANAGER = "data_manager.py"
REQUIREMENTS_TXT = "requirements.txt"
CONDA_YAML = ("conda.yaml", "conda.yml")

# `python=3.8`, `python==3.8.10`, `python>=3.9`, `python 3.8` (conda match specs).
PYTHON_PIN = re.compile(r"^python\s*(?P<op>==|>=|<=|!=|~=|=|<|>|\s)\s*(?P<version>[\w.*]+)$")


@dataclass(frozen=True)
class ContractOk:
    """The repo is buildable: these requirement lines go to the installer."""

    dependency_file: str
    requirements: tuple[str, ...]
    warnings: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class ContractViolation:
    """The repo cannot be built; `reason` says exactly why."""

    reason: str


def check_contract(
    repo_dir: Path, runtime_python: tuple[int, int, int] | None = None
) -> ContractOk | ContractViolation:
    """Check `repo_dir` against the ML repo contract; `runtime_python` is the environments' version."""
    runtime = runtime_python or sys.version_info[:3]
    if not (repo_dir / MODEL_MANAGER).is_file():
        return ContractViolation(f"{MODEL_MANAGER} is missing from the repository root")
    warnings: list[str] = []
    if not (repo_dir / DATA_MANAGER).is_file():
        warnings.append(f"{DATA_MANAGER} is missing from the repository root; learners cannot load data")
    conda = next((repo_dir / n for n in CONDA_YAML if (repo_dir / n).is_file()), None)
    requirements_txt = repo_dir / REQUIREMENTS_TXT
    if requirements_txt.is_file():
        if conda is not None:
            warnings.append(f"both {REQUIREMENTS_TXT} and {conda.name} exist; using {REQUIREMENTS_TXT}")
        parsed = parse_requirements_txt(requirements_txt.read_text(encoding="utf-8"))
        dep_file = REQUIREMENTS_TXT
    elif conda is not None:
        parsed = parse_conda_yaml(conda.read_text(encoding="utf-8"), conda.name, runtime)
        dep_file = conda.name
    else:
        return ContractViolation(
            f"no dependency file: expected {REQUIREMENTS_TXT} or {CONDA_YAML[0]} in the repository root"
        )
    if isinstance(parsed, ContractViolation):
        return parsed
    requirements, dep_warnings = parsed
    return ContractOk(dep_file, tuple(requirements), tuple(warnings + dep_warnings))


def parse_requirements_txt(text: str) -> tuple[list[str], list[str]] | ContractViolation:
    """Requirement lines of a requirements.txt (comments and blanks dropped, pip options kept)."""
    lines: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        problem = _invalid_requirement(line)
        if problem:
            return ContractViolation(f"{REQUIREMENTS_TXT} line {number}: {problem}")
        lines.append(line)
    return lines, []


def parse_conda_yaml(
    text: str, name: str, runtime: tuple[int, int, int]
) -> tuple[list[str], list[str]] | ContractViolation:
    """The `- pip:` requirements of a conda environment file, plus warnings for what is ignored."""
    try:
        doc: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return ContractViolation(f"{name} is not valid YAML: {exc}")
    if not isinstance(doc, dict) or not isinstance(doc.get("dependencies"), list):
        return ContractViolation(f"{name} has no 'dependencies:' list")
    requirements: list[str] = []
    warnings: list[str] = []
    for dep in doc["dependencies"]:
        if isinstance(dep, dict) and "pip" in dep:
            pip_list = dep["pip"] or []
            if not isinstance(pip_list, list):
                return ContractViolation(f"{name}: 'pip:' must be a list of requirements")
            for entry in pip_list:
                line = str(entry).strip()
                problem = _invalid_requirement(line)
                if problem:
                    return ContractViolation(f"{name} pip entry {line!r}: {problem}")
                requirements.append(line)
        elif isinstance(dep, str):
            warning = _conda_dependency_warning(dep.strip(), name, runtime)
            if warning:
                warnings.append(warning)
        else:
            return ContractViolation(f"{name}: unexpected dependency entry {dep!r}")
    return requirements, warnings


def _conda_dependency_warning(dep: str, name: str, runtime: tuple[int, int, int]) -> str | None:
    runtime_text = ".".join(map(str, runtime))
    if dep == "python":
        return None
    match = PYTHON_PIN.match(dep)
    if match:
        if _python_pin_matches(match["op"].strip() or "=", match["version"], runtime):
            return None
        return f"{name} pins {dep}; the environment uses Python {runtime_text}"
    if re.match(r"^pip(\W|$)", dep):
        return f"{name} lists {dep!r}; pip comes with the environment, the entry is ignored"
    return f"{name} lists conda package {dep!r}; conda-only packages are not installed (list it under pip:)"


def _python_pin_matches(op: str, version: str, runtime: tuple[int, int, int]) -> bool:
    """Whether the runtime satisfies a conda python pin (`=3.8` means 3.8.*, as in conda)."""
    current = Version(".".join(map(str, runtime)))
    try:
        if op == "=" or (op == "==" and "*" in version):
            return SpecifierSet(f"=={version.rstrip('.*')}.*").contains(current)
        if op == "==":
            # conda's `python==3.8` is a 3.8.* pin in practice; compare only the given components
            given = version.split(".")
            return [str(p) for p in runtime[: len(given)]] == given
        return SpecifierSet(f"{op}{version}").contains(current)
    except InvalidSpecifier:
        return False


def _invalid_requirement(line: str) -> str | None:
    """Why `line` cannot be handed to pip/uv, or None if it can."""
    if line.startswith("-") or "://" in line or line.startswith((".", "/")):
        return None  # pip options, URLs and paths go to the installer verbatim
    try:
        Requirement(line)
    except InvalidRequirement as exc:
        return f"not a valid requirement: {exc}"
    return None
