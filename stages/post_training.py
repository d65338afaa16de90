"""Post-training: per the SLA, package the best model and serve it; no steps means done."""

from __future__ import annotations

import secrets

from flops.hooks import Decision, StageContext, StageHooks
from flops.lifecycle import Project
from flops.messages import CommandFailed, ModelBuilt, ModelFailed, ModelServed, ReportBase
from flops.sla import PostTrainingStep


class PostTraining(StageHooks):
    def on_enter(self, project: Project, ctx: StageContext) -> Decision | None:
        steps = project.sla.post_training_steps
        if PostTrainingStep.BUILD_IMAGE_FOR_TRAINED_MODEL not in steps:
            return Decision.accept("post_trained", reason="training completed")
        # The model file lives where the aggregator ran; package it there.
        agent_id = project.ctx["aggregator"]["agent_id"]
        project.ctx["model_build_command_id"] = ctx.command(
            project,
            agent_id,
            "build_model_image",
            {
                "artifact": project.ctx.get("artifact", {}),
                "model": project.ctx.get("model", {}),
                # The trained-model image is <registry>/<customer>/trained_model:<project id>.
                "customer": project.record.customer,
                "project_id": project.project_id,
                # Tracked: the image serves the model logged to MLflow (url, model_uri).
                "tracking": project.ctx.get("tracking") or None,
            },
        )
        project.ctx["critical_agents"] = [agent_id]
        return None

    def on_report(self, project: Project, report: ReportBase, ctx: StageContext) -> Decision:
        if isinstance(report, ModelBuilt) and report.command_id == project.ctx.get("model_build_command_id"):
            project.ctx["model_image"] = report.image_ref
            ctx.event(project, "report.accepted", f"model packaged: {report.image_ref}")
            if PostTrainingStep.DEPLOY_TRAINED_MODEL_IMAGE not in project.sla.post_training_steps:
                return Decision.accept("post_trained", reason="model packaged")
            agent_id = self._serving_agent(project, ctx)
            project.ctx["serve_command_id"] = ctx.command(
                project, agent_id, "serve_model", {"image_ref": report.image_ref, "token": _model_token(project)}
            )
            project.ctx["serve_agent"] = agent_id
            project.ctx["critical_agents"] = [agent_id]
            return Decision.accept()
        if isinstance(report, ModelServed) and report.command_id == project.ctx.get("serve_command_id"):
            project.ctx["model_url"] = report.url
            return Decision.accept("post_trained", reason=f"model served at {report.url}")
        pending = {project.ctx.get("model_build_command_id"), project.ctx.get("serve_command_id")}
        if isinstance(report, ModelFailed | CommandFailed) and report.command_id in pending:
            tail = f"\n{report.log_tail}" if report.log_tail else ""
            return Decision.fail(f"post-training failed: {report.reason}{tail}")
        return super().on_report(project, report, ctx)

    @staticmethod
    def _serving_agent(project: Project, ctx: StageContext) -> str:
        builder_agent = project.ctx["aggregator"]["agent_id"]
        # The packaged model is a local directory on that agent; serve it there when it can serve.
        here = ctx.agents.get(builder_agent)
        if here is not None and here.online and "serve" in here.roles:
            return builder_agent
        servers = ctx.agents.online("serve")
        return servers[0].agent_id if servers else builder_agent


HOOKS = PostTraining()


def _model_token(project: Project) -> str:
    """The inference server's bearer token: the project's customer reads it from the project's state (which
    only they and operators may read); nobody else can query the model."""
    token = project.ctx.get("model_token") or secrets.token_urlsafe(24)
    project.ctx["model_token"] = token
    return str(token)
