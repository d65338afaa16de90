#!/usr/bin/env bash
# Install everything the tests need (Mosquitto, the image tools and Chromium from apt when missing, the venv with
# all extras), lint, and run the test suite. The tests start their own Mosquitto on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."
FLOPS_IMAGE_TOOLS=1 FLOPS_BROWSER=1 bash scripts/install.sh agent,runtime,ui,tracking,oakestra,test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/pytest -q --durations=25 "$@"
