"""A project's tracking as the manager sees it: switched on at start when ``FLOPS_TRACKING_URI`` is set,
handed to the aggregator in its command (and from there in its environment), and filled in from the
aggregator's ``tracking.logged`` reports, which never fail a project (a warning event at most)."""

from __future__ import annotations

import json
from typing import Any

from flops.hooks import Decision, StageContext
from flops.lifecycle import Project
from flops.messages import TrackingLogged
from flops.sla import TrainingMode

ENV = "FLOPS_TRACKING"
"""The aggregator's environment variable carrying its tracking spec (JSON)."""

MAX_WARNINGS = 20


def experiment_name(project_id: str) -> str:
    """The experiment a project's runs go to, as in the original FLOps."""
    return f"FLOps Project {project_id}"


def start(project: Project, ctx: StageContext) -> None:
    """At start: tracking is on for this project when the manager has a tracking URI."""
    uri = ctx.settings.tracking_uri
    if not uri or "tracking" in project.ctx:
        return
    project.ctx["tracking"] = {"url": uri.rstrip("/"), "experiment": experiment_name(project.project_id)}
    ctx.event(project, "report.accepted", f"tracking in MLflow at {uri} as {experiment_name(project.project_id)!r}")


def aggregator_spec(project: Project, unit: str = "round") -> dict[str, Any] | None:
    """What the aggregator needs to log (None: tracking off); ``unit`` names its runs (``cycle`` for the root
    aggregator of hierarchical mode, whose rounds are the cycles)."""
    tracking = project.ctx.get("tracking")
    if not tracking:
        return None
    return {
        "url": tracking["url"],
        "experiment": tracking["experiment"],
        "project_id": project.project_id,
        "flavor": project.sla.ml_model_flavor.value,
        "registered_model": f"flops-{project.project_id}",
        "unit": unit,
    }


def child_env(spec: dict[str, Any]) -> dict[str, str]:
    """The aggregator child's environment for the ``tracking`` entry of its command spec."""
    tracking = spec.get("tracking")
    return {ENV: json.dumps(tracking)} if tracking else {}


def note(project: Project, report: TrackingLogged, ctx: StageContext) -> Decision:
    """Fold one ``tracking.logged`` report into the project's tracking record and event stream."""
    tracking: dict[str, Any] = project.ctx.setdefault("tracking", {})
    if report.url:
        tracking["url"] = report.url
    if report.experiment_id:
        tracking["experiment_id"] = report.experiment_id
        tracking["experiment_url"] = f"{tracking.get('url', '')}/#/experiments/{report.experiment_id}"
    if report.warning:
        warnings: list[str] = tracking.setdefault("warnings", [])
        warnings.append(report.warning)
        del warnings[:-MAX_WARNINGS]
        ctx.event(project, "warning", f"tracking: {report.warning}")
        return Decision.accept()
    if report.model_uri:
        tracking.update(
            run_id=report.run_id,
            run_url=_run_url(tracking, report.run_id),
            model_uri=report.model_uri,
            registered_model=report.registered_model,
            model_version=report.model_version,
        )
        version = f" as {report.registered_model} version {report.model_version}" if report.model_version else ""
        ctx.event(
            project,
            "report.accepted",
            f"best model logged to MLflow run {report.run_id}{version}",
            run_id=report.run_id,
            model_uri=report.model_uri,
            model_version=report.model_version,
        )
    elif report.round is not None and report.run_id:
        tracking.setdefault("run_ids", {})[str(report.round)] = report.run_id
        unit = "cycle" if project.sla.training_configuration.mode is TrainingMode.HIERARCHICAL else "round"
        ctx.event(
            project,
            "report.accepted",
            f"{unit} {report.round} logged to MLflow run {report.run_id}",
            round=report.round,
            run_id=report.run_id,
        )
    return Decision.accept()


def _run_url(tracking: dict[str, Any], run_id: str | None) -> str | None:
    if not run_id or not tracking.get("experiment_id"):
        return None
    return f"{tracking.get('url', '')}/#/experiments/{tracking['experiment_id']}/runs/{run_id}"
