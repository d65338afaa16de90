"""FLOps on Oakestra: a client of Oakestra's System Manager (root orchestrator), the deployer logic that places a
project's actors as Oakestra services and follows them, and a fake System Manager to test both without a cluster.

The REST contract they speak is the one of ``oakestra/oakestra:root_orchestrator/system-manager-python`` (v0.4.411).
"""
