"""The project stages and outcomes (kept apart from the machine so messages can name them)."""

from __future__ import annotations

import enum


class Stage(enum.StrEnum):
    PREPARATION = "preparation"
    START = "start"
    BUILDER = "builder"
    LEARNERS = "learners"
    AGGREGATION = "aggregation"
    POST_TRAINING = "post_training"
    FINISHED = "finished"


class Outcome(enum.StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STAGES: tuple[Stage, ...] = tuple(s for s in Stage if s is not Stage.FINISHED)
