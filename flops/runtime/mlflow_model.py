"""The trained model in MLflow's model format, for its flavor (run inside the trained-model image's build).

When the project is tracked (``--model-uri`` and ``--tracking-uri``) it is the model the aggregator logged
to MLflow, downloaded as it was logged; otherwise, or when that cannot be had, it is made here:

``python -m flops.runtime.mlflow_model --repo DIR --params model.npz --flavor sklearn --out DIR`` imports the
repo's ``ModelManager``, sets the aggregator's best parameters (``np.savez`` of the parameter list) and saves
``get_model()`` with MLflow's flavor module (``mlflow.sklearn.save_model`` …). A flavor whose MLflow module
cannot save this object (or is not installed) falls back to a pyfunc model that calls its ``predict()``,
so MLflow's scoring server can serve every repo that honours the FLOps contract.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

FLAVOR_MODULES = {"sklearn": "mlflow.sklearn", "pytorch": "mlflow.pytorch", "keras": "mlflow.tensorflow"}
FLAVOR_MODULES["tensorflow"] = "mlflow.tensorflow"
# MLflow's default for sklearn (skops) is not a dependency of mlflow-skinny; cloudpickle is.
FLAVOR_OPTIONS: dict[str, dict[str, Any]] = {"sklearn": {"serialization_format": "cloudpickle"}}


def trained_model(repo: Path, params: Path) -> Any:
    """The repo's model with the saved parameters set."""
    from flops.runtime.repo import new_model_manager
    from flops.runtime.serve import load_parameters

    manager = new_model_manager(repo)
    manager.set_model_parameters(load_parameters(params))
    model = manager.get_model()
    if not callable(getattr(model, "predict", None)):
        raise TypeError(f"ModelManager.get_model() returned {type(model).__name__}, which has no predict()")
    return model


def save(model: Any, flavor: str, out: Path) -> str:
    """Save ``model`` at ``out`` in MLflow's format; returns the flavor it was saved with."""
    try:
        module = importlib.import_module(FLAVOR_MODULES[flavor])
        options = FLAVOR_OPTIONS.get(flavor, {})
        module.save_model(model, str(out), **options)
        return flavor
    except (KeyError, ImportError, TypeError, ValueError, AttributeError) as exc:
        log.warning("saving as a pyfunc model", flavor=flavor, error=f"{type(exc).__name__}: {exc}")
    import mlflow.pyfunc

    class Predicting(mlflow.pyfunc.PythonModel):  # type: ignore[misc,name-defined]
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def predict(self, context: Any, model_input: Any, params: Any = None) -> Any:
            return self.inner.predict(model_input)

    mlflow.pyfunc.save_model(str(out), python_model=Predicting(model))
    return "python_function"


def fetch(model_uri: str, tracking_uri: str, out: Path) -> None:
    """The model the aggregator logged to MLflow (``models:/…`` or ``runs:/…``), downloaded to ``out``."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(out.parent / ".fetched")))
    found = next((p.parent for p in [local / "MLmodel", *local.rglob("MLmodel")] if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{model_uri} holds no MLmodel file")
    found.rename(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flops.runtime.mlflow_model", description=__doc__)
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--params", type=Path, required=True)
    p.add_argument("--flavor", default="sklearn")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model-uri", default=None, help="the model logged to MLflow; --params when it cannot be had")
    p.add_argument("--tracking-uri", default=None)
    args = p.parse_args(argv)
    if args.model_uri and args.tracking_uri:
        try:
            fetch(args.model_uri, args.tracking_uri, args.out)
            print(f"the trained model is {args.model_uri}, logged to {args.tracking_uri}", file=sys.stderr)
            return 0
        except Exception as exc:  # a tracking server that is down fails nothing: the saved parameters serve
            what = f"{type(exc).__name__}: {exc}"
            print(f"warning: cannot fetch {args.model_uri} ({what}); saving --params", file=sys.stderr)
    saved = save(trained_model(args.repo, args.params), args.flavor, args.out)
    print(f"saved the trained model as MLflow {saved} model at {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
