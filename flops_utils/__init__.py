"""Helpers that ML repositories written for FLOps import (``flops_utils.*`` compatible paths).

The templates define the ML repository contract; the building blocks give a learner its
node-local data. Nothing here configures anything at import time.
"""
