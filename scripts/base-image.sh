#!/usr/bin/env bash
# The base image the Dockerfile builds on.
#
#   scripts/base-image.sh [NAME]     build NAME (default airlock-base:bookworm) from Debian packages
#   scripts/base-image.sh --pick     print the base to use: $AIRLOCK_BASE_IMAGE if set, else the
#                                    official python:3.11-slim-bookworm if present or pullable,
#                                    else airlock-base:bookworm (built here when missing)
#
# The Debian build (debootstrap + docker import) is for hosts that reach no container registry.
# It stands in for the official image: the Dockerfile only needs `python3 -m venv`, which both
# have (Debian's python3 is /usr/bin/python3, the official one /usr/local/bin/python3).
# Needs root for debootstrap and about a minute. DEBIAN_MIRROR picks another mirror.
set -euo pipefail

OFFICIAL="python:3.11-slim-bookworm"
LOCAL="airlock-base:bookworm"

build() {
    local name="$1" mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}" rootfs
    if docker image inspect "$name" >/dev/null 2>&1; then
        echo "base-image: $name already exists" >&2
        return 0
    fi
    command -v debootstrap >/dev/null || { echo "base-image: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
    echo "base-image: building $name from Debian bookworm packages (about a minute)" >&2
    rootfs="$(mktemp -d)"
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" "$mirror" >&2
    # what a runtime image never needs: apt lists and caches, docs, man pages, locales
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
           "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" -c . | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$name" >/dev/null
    echo "base-image: built $name" >&2
}

if [[ "${1:-}" == "--pick" ]]; then
    if [[ -n "${AIRLOCK_BASE_IMAGE:-}" ]]; then
        echo "$AIRLOCK_BASE_IMAGE"
    elif docker image inspect "$OFFICIAL" >/dev/null 2>&1 || docker pull -q "$OFFICIAL" >/dev/null 2>&1; then
        echo "$OFFICIAL"
    else
        echo "base-image: no registry answers; using $LOCAL" >&2
        build "$LOCAL"
        echo "$LOCAL"
    fi
else
    build "${1:-$LOCAL}"
fi
