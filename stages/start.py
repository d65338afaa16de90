"""Start: allocate the project's workspace (where its artifacts and metrics live)."""

from __future__ import annotations

from flops.hooks import Decision, StageContext, StageHooks
from flops.lifecycle import Project
from flops.tracking import project as tracking


class Start(StageHooks):
    def on_enter(self, project: Project, ctx: StageContext) -> Decision | None:
        root = ctx.settings.data_dir / "projects" / project.project_id
        project.ctx["workspace"] = {
            "root": str(root),
            "artifacts": str(root / "artifacts"),
            "metrics": str(root / "metrics"),
        }
        # Directories are created lazily by whoever writes there (agents may be on other hosts).
        tracking.start(project, ctx)
        return Decision.accept("started")

    def on_resume(self, project: Project, ctx: StageContext) -> Decision | None:
        return self.on_enter(project, ctx)


HOOKS = Start()
