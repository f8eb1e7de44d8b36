#!/usr/bin/env bash
# Build (or reuse) the mailwarden container images and tag mailwarden/stack:latest, for
# deploy/container/compose.yaml.  Same recipe as the container tests and `make demo`:
#   mailwarden/bookworm:HASH  debootstrap --variant=minbase bookworm + docker import
#   mailwarden/stack:HASH     deploy/container/Containerfile (Debian mail packages, mailwarden)
# Starts dockerd for the build if none answers, and stops it again afterwards.
#   scripts/container-build.sh                             # no registry needed
#   scripts/container-build.sh --base debian:bookworm-slim # where a registry is reachable
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m harness.containers build "$@"
