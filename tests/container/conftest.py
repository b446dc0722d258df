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


SERVER_IMAGE = os.environ.get("AIRLOCK_SERVER_IMAGE", "airlock-vllm:cpu")


def vllm_cpu_runs_here() -> str | None:
    """Why this host's CPU cannot run vLLM-CPU (as `just server-check`), or None."""
    import platform

    if platform.machine() != "x86_64":
        return f"a {platform.machine()} host; airlock-vllm:cpu is built for x86_64"
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return None  # cannot tell: try
    return None if "avx2" in flags else "this CPU lacks AVX2, the least vLLM's CPU kernels need"


@pytest.fixture(scope="session")
def vllm_cpu_image(docker_client):
    """The generation server image (Dockerfile.vllm, CPU build); skips with the reason when it is
    not built or this CPU cannot run it."""
    import docker

    try:
        img = docker_client.images.get(SERVER_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.skip(f"image {SERVER_IMAGE} is not built; run `just build`")
    if img.attrs["Config"]["Labels"].get("airlock.variant") != "vllm-cpu":
        pytest.skip(f"{SERVER_IMAGE} is not the CPU build; these tests run airlock-vllm:cpu")
    why = vllm_cpu_runs_here()
    if why:
        pytest.skip(f"vLLM-CPU cannot run here: {why} (`just server=serve up` is the fallback)")
    return img
