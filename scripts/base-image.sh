#!/usr/bin/env bash
# Build a Python 3.11 base image from Debian packages (debootstrap + docker import), for
# hosts that cannot reach a container registry. The result stands in for the official
# python:3.11-slim-bookworm image: the Dockerfile only needs `python3 -m venv`.
#
#   scripts/base-image.sh [NAME]        (default airlock-base:bookworm)
#
# Needs root (debootstrap) and about a minute. Set DEBIAN_MIRROR to use another mirror.
set -euo pipefail

name="${1:-airlock-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$name" >/dev/null 2>&1; then
    echo "base-image: $name already exists"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "base-image: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }

rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT

debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "$mirror"

# Drop what a runtime image never needs: apt lists, docs, man pages, locales.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
       "$rootfs"/var/cache/apt/archives/*.deb \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*

tar -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$name"
echo "base-image: built $name from Debian bookworm packages"
