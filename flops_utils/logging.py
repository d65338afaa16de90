"""The ``logger`` that FLOps ML repositories import (``from flops_utils.logging import logger``).

A plain stdlib logger named ``flops_utils``: it has no handlers of its own, so the process that
hosts the repository (learner / aggregator) decides where records go.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("flops_utils")
colorful_logger = logger
