#!/usr/bin/env bash
# Install FLOps into ./.venv with what it needs on a fresh Debian/Ubuntu machine:
# Mosquitto (the embedded broker), git (the builder clones ML repos), python3-venv; with FLOPS_IMAGE_TOOLS=1
# also the image tools, with FLOPS_BROWSER=1 Chromium (the tests set both).
# Usage: bash scripts/install.sh [extras]   (default extras: agent,runtime)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-agent,runtime}"

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v git >/dev/null 2>&1 || need+=(git)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
# The image builder and the FLOps image registry (buildah, skopeo, podman, docker-registry; debootstrap makes
# the offline Debian base; qemu-user-static + binfmt-support build foreign platforms): only when asked, since
# `flops demo` and the development setup need none of them.
if [ "${FLOPS_IMAGE_TOOLS:-0}" = 1 ]; then
    for tool in buildah skopeo podman runc docker-registry debootstrap; do
        command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || need+=("$tool")
    done
    [ -e /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static binfmt-support)
    # binfmt_misc is not mounted on these hosts: mount it first, so qemu-user-static registers its handlers
    # (foreign-platform builds run under them; the builder mounts it too when it can).
    if [ ! -e /proc/sys/fs/binfmt_misc/status ] && [ "$(id -u)" -eq 0 ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || true
    fi
fi
# Headless Chromium for the web view's browser tests (Playwright drives Debian's; it downloads none).
if [ "${FLOPS_BROWSER:-0}" = 1 ]; then
    command -v chromium >/dev/null 2>&1 || need+=(chromium)
fi
if [ ${#need[@]} -gt 0 ] && ! command -v apt-get >/dev/null 2>&1; then
    echo "no apt-get: install ${need[*]} yourself (the tests that need them say so)" >&2
elif [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing ${need[*]} with apt-get" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "FLOps needs Python >= 3.11")'
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[${extras}]"
echo "installed: $(.venv/bin/flops --help >/dev/null && echo .venv/bin/flops)" >&2
