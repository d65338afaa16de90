"""What happens inside each stage: one module per stage, each exposing ``HOOKS`` (a StageHooks)."""

from __future__ import annotations

from flops.hooks import StageHooks
from flops.lifecycle_stages import Stage


def hooks_by_stage() -> dict[Stage, StageHooks]:
    from stages import aggregation, builder, finished, learners, post_training, preparation, start

    return {
        Stage.PREPARATION: preparation.HOOKS,
        Stage.START: start.HOOKS,
        Stage.BUILDER: builder.HOOKS,
        Stage.LEARNERS: learners.HOOKS,
        Stage.AGGREGATION: aggregation.HOOKS,
        Stage.POST_TRAINING: post_training.HOOKS,
        Stage.FINISHED: finished.HOOKS,
    }
