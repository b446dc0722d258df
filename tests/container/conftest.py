"""Fixtures for the container tests: a Docker client (the tests skip, with the reason, when no
daemon answers or the image is not built) and host folders bind-mounted as the volumes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

IMAGE = os.environ.get("AIRLOCK_IMAGE", "airlock:cpu")


def _client():
    try:
        import docker
    except ImportError:
        pytest.skip("the docker SDK is not installed (pip install docker, or run `just test-container`)")
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except Exception as e:  # no socket, no permission, daemon down: all mean "cannot test here"
        pytest.skip(f"no Docker daemon answers ({type(e).__name__}); start dockerd or run `scripts/bootstrap.sh`")
    return client


@pytest.fixture(scope="session")
def docker_client():
    return _client()


@pytest.fixture(scope="session")
def image(docker_client):
    import docker

    try:
        return docker_client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.skip(f"image {IMAGE} is not built; run `just build`")


@pytest.fixture
def volumes(tmp_path) -> dict:
    """Fresh host folders for checkpoints and metrics, mounted where the image expects them."""
    host = {"checkpoints": tmp_path / "checkpoints", "metrics": tmp_path / "metrics"}
    for p in host.values():
        p.mkdir()
    return host


def mounts(host: dict) -> dict:
    return {str(path): {"bind": f"/app/volumes/{name}", "mode": "rw"} for name, path in host.items()}


def me() -> str:
    return f"{os.getuid()}:{os.getgid()}"


ROOT = Path(__file__).resolve().parents[2]
