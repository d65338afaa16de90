#!/bin/sh
# Entry point of the FLOps control-plane image: unpacks this service's secrets, loads its FLOps env file, runs
# the command.
#   FLOPS_BUNDLE       base64 of a tar.gz of the files `flops setup production` wrote for this service, at their
#                      absolute paths (render.sh makes it); unpacked under FLOPS_BUNDLE_ROOT (default /), then
#                      removed from the environment
#   FLOPS_ENV_FILE     env files of that bundle (env/<name>.env), space-separated, to load in order before the
#                      command, e.g. the manager's (and, placing actors on Oakestra, env/oakestra.env)
#   FLOPS_BROKER_DATA  a directory to create and hand to the mosquitto user (the broker's persistence)
# Oakestra's `cmd` replaces the image's ENTRYPOINT: SLAs name this script first, then the command.
set -eu
root="${FLOPS_BUNDLE_ROOT:-/}"
if [ -n "${FLOPS_BUNDLE:-}" ]; then
    umask 077
    printf '%s' "$FLOPS_BUNDLE" | base64 -d | tar -xz -C "$root"
    umask 022
fi
unset FLOPS_BUNDLE
if [ -n "${FLOPS_ENV_FILE:-}" ]; then
    set -a
    for env_file in $FLOPS_ENV_FILE; do
        . "${root%/}${env_file}"
    done
    set +a
fi
if [ -n "${FLOPS_BROKER_DATA:-}" ]; then
    mkdir -p "${root%/}${FLOPS_BROKER_DATA}"
    # Mosquitto started as root drops to its own user before reading its files (deploy/README.md, step 2).
    if id mosquitto >/dev/null 2>&1; then
        chown -R mosquitto: "${root%/}$(dirname "$FLOPS_BROKER_DATA")"
    fi
fi
exec "$@"
