"""The ML repo contract: which files are required, how conda.yaml / requirements.txt are read."""

from __future__ import annotations

from pathlib import Path

import pytest

from flops.builder.contract import ContractOk, ContractViolation, check_contract

RUNTIME = (3, 11, 7)


def write(repo: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (repo / name).write_text(text, encoding="utf-8")
    return repo


def test_conda_yaml_pip_list_becomes_requirements_and_the_rest_warnings(tmp_path: Path) -> None:
    conda = "dependencies:\n  - python=3.8\n  - pip\n  - numpy=1.24\n  - pip:\n    - scikit-learn\n    - x==1\n"
    repo = write(tmp_path, {"model_manager.py": "", "data_manager.py": "", "conda.yaml": conda})

    result = check_contract(repo, RUNTIME)

    assert isinstance(result, ContractOk)
    assert result.requirements == ("scikit-learn", "x==1")
    assert len(result.warnings) == 3
    assert "python=3.8" in result.warnings[0] and "3.11.7" in result.warnings[0]
    assert "numpy=1.24" in result.warnings[2]


@pytest.mark.parametrize("pin", ["python=3.11", "python==3.11", "python>=3.8", "python=3.11.7", "python"])
def test_python_pin_the_runtime_satisfies_is_not_a_warning(tmp_path: Path, pin: str) -> None:
    conda = f"dependencies:\n  - {pin}\n  - pip:\n    - numpy\n"
    repo = write(tmp_path, {"model_manager.py": "", "data_manager.py": "", "conda.yaml": conda})

    result = check_contract(repo, RUNTIME)

    assert isinstance(result, ContractOk)
    assert result.warnings == ()


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"data_manager.py": "", "requirements.txt": ""}, "model_manager.py is missing"),
        ({"model_manager.py": ""}, "no dependency file"),
        ({"model_manager.py": "", "conda.yaml": "dependencies: [\n"}, "not valid YAML"),
        ({"model_manager.py": "", "conda.yaml": "name: x\n"}, "no 'dependencies:' list"),
        ({"model_manager.py": "", "requirements.txt": "ok==1\nnot valid!!\n"}, "line 2"),
    ],
)
def test_violations_name_the_problem(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    result = check_contract(write(tmp_path, files), RUNTIME)

    assert isinstance(result, ContractViolation)
    assert expected in result.reason


def test_requirements_txt_wins_over_conda_yaml_and_missing_data_manager_warns(tmp_path: Path) -> None:
    files = {"model_manager.py": "", "requirements.txt": "# deps\nnumpy>=1 # inline\n\n", "conda.yaml": "x"}

    result = check_contract(write(tmp_path, files), RUNTIME)

    assert isinstance(result, ContractOk)
    assert result.requirements == ("numpy>=1",)
    assert any("data_manager.py" in w for w in result.warnings)
    assert any("using requirements.txt" in w for w in result.warnings)
