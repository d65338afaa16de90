"""Prove a built environment can run the repo's model: import `model_manager.ModelManager` in it,
instantiate it, and ask once for its parameters (which Flower does before the first round). It also records
whether ``fit_model`` takes the round's training configuration (``fit_model(self, config)``), which strategies
with a client side (FedProx's proximal term) need.

Runs in a child interpreter of the new environment, never in the builder's own process, so a repo's
import side effects cannot touch the agent. `set_model_data()` is not called: it needs node-local data.
"""

from __future__ import annotations

import json
from pathlib import Path

from flops.builder.process import CommandFailed, StepFailed, run, tail

RESULT_MARKER = "FLOPS_IMPORT_CHECK "

# Kept free of our own imports: it must run with only the environment's packages.
CHECK_SCRIPT = """
import inspect, json, sys
sys.path.insert(0, sys.argv[1])
from model_manager import ModelManager
import numpy as np
manager = ModelManager()
params = manager.get_model_parameters()
if not isinstance(params, list) or not all(isinstance(p, np.ndarray) for p in params):
    kinds = sorted({type(p).__name__ for p in params}) if isinstance(params, (list, tuple)) else []
    print("get_model_parameters() returned %s%s, expected a list of numpy arrays"
          % (type(params).__name__, " of " + ", ".join(kinds) if kinds else ""), file=sys.stderr)
    sys.exit(3)
kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
fit_config = any(p.kind in kinds for p in inspect.signature(manager.fit_model).parameters.values())
print(MARKER + json.dumps({"arrays": len(params), "shapes": [list(p.shape) for p in params], "fit_config": fit_config}))
""".replace("MARKER", repr(RESULT_MARKER))

# A repo must never download at build time, and must not litter its checkout with bytecode.
CHECK_ENV = {
    "PYTHONPATH": "",
    "PYTHONNOUSERSITE": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "MPLBACKEND": "Agg",
}


def check_model_manager(python: Path, repo_dir: Path, *, timeout_s: float) -> dict[str, object]:
    """Run the check; returns what it learned (number and shapes of arrays) or raises `StepFailed`."""
    try:
        out = run(python, ["-c", CHECK_SCRIPT, repo_dir], timeout_s=timeout_s, cwd=repo_dir, env=CHECK_ENV)
    except CommandFailed as exc:
        if exc.timed_out:
            raise StepFailed(
                "import_check", f"importing model_manager.ModelManager timed out after {timeout_s:.0f}s"
            ) from exc
        lines = [line for line in exc.output.strip().splitlines() if line.strip()]
        last = lines[-1].strip() if lines else f"exit code {exc.exit_code}"
        reason = f"model_manager.ModelManager check failed: {last}"
        raise StepFailed("import_check", reason, tail(exc.output)) from exc
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_MARKER):
            result: dict[str, object] = json.loads(line.removeprefix(RESULT_MARKER))
            return result
    raise StepFailed("import_check", "model_manager.ModelManager check printed no result", tail(out))
