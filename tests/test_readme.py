"""The README's promises that can drift: the stage diagram and the commands it tells users to run."""

from __future__ import annotations

from pathlib import Path

from flops.lifecycle import mermaid

ROOT = Path(__file__).resolve().parent.parent


def test_readme_diagram_is_the_machine_definition() -> None:
    assert mermaid() in (ROOT / "README.md").read_text()


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/test.sh" in readme
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == "bash scripts/test.sh"


def test_every_setting_is_documented_with_its_variable() -> None:
    from flops.settings import Settings

    readme = (ROOT / "README.md").read_text()
    missing = [f"FLOPS_{name.upper()}" for name in Settings.model_fields if f"FLOPS_{name.upper()}" not in readme]
    assert not missing, f"settings not in the README's table: {missing}"
