"""Fixtures for the container tests: a Docker client (the tests skip, with the reason, when no
daemon answers or the image is not built) and host folders bind-mounted as the volumes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

IMAGE = os.environ.get("AIRLOCK_IMAGE", "airlock:cpu")

# Triton's NVIDIA driver builds its launcher module (driver.c: Python.h, cuda.h, linked against
# libcuda.so.1) with the C compiler the first time a kernel runs. Here libcuda.so.1 is a stub
# holding the driver functions driver.c names (the host's driver provides the real one), so the
# module compiles, links and imports exactly as on a GPU. Then a kernel goes through Triton's
# compiler (TTIR -> LLVM -> PTX -> ptxas) to a cubin for sm_90, which needs no device either. It
# runs from a file: @triton.jit reads its function's source.
TRITON_SCRIPT = """
import json, os, re, subprocess
stub = os.environ["TRITON_LIBCUDA_PATH"]
from triton.backends.nvidia import driver
src = open(os.path.join(driver.dirname, "driver.c")).read()
names = sorted(set(re.findall(r"\\b(cu[A-Z][A-Za-z0-9_]*)\\s*\\(", src)))
code = "".join(f"int {n}(void) {{ return 999; }}\\n" for n in names)
subprocess.run(["gcc", "-shared", "-fPIC", "-x", "c", "-", "-o", stub + "/libcuda.so.1"],
               input=code.encode(), check=True)
utils = driver.CudaUtils()
cache = os.environ["TRITON_CACHE_DIR"]
built = [f for _, _, fs in os.walk(cache) for f in fs if f.startswith("cuda_utils")]

import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

@triton.jit
def add(x, y, out, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out + i, tl.load(x + i, mask=i < n) + tl.load(y + i, mask=i < n), mask=i < n)

k = triton.compile(ASTSource(add, {"x": "*fp32", "y": "*fp32", "out": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                             constexprs={"BLOCK": 128}), target=GPUTarget("cuda", 90, 32))
print(json.dumps({"stubbed": len(names), "launcher": callable(utils.launch), "built": built,
                  "cubin": len(k.asm["cubin"]), "ptx_target": re.search(r"\\.target (\\S+)", k.asm["ptx"]).group(1)}))
"""
TRITON_PROBE = ["-c", 'mkdir -p /tmp/stub && printf %s "$0" > /tmp/t.py && exec python3 /tmp/t.py', TRITON_SCRIPT]
TRITON_PROBE_ENV = {"TRITON_LIBCUDA_PATH": "/tmp/stub", "LD_LIBRARY_PATH": "/tmp/stub", "TRITON_CACHE_DIR": "/tmp/triton"}


def check_triton_probe(code: int, logs: str) -> None:
    """TRITON_PROBE's run (entrypoint sh) built and loaded the launcher and compiled for sm_90."""
    assert code == 0, logs[-3000:]
    got = last_json(logs)
    print(f"triton without a GPU: {got}")
    assert got["launcher"] and got["built"] and got["stubbed"] >= 10, got
    assert got["cubin"] > 0 and got["ptx_target"].startswith("sm_90"), got


def last_json(logs: str) -> dict:
    """The last line of a container's output that is a JSON object (what its script printed)."""
    return json.loads(next(line for line in reversed(logs.strip().splitlines()) if line.startswith("{")))


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


def wait_for_vllm(c, t0: float, timeout: float = 600) -> float:
    """Wait for vLLM's start-up line in container `c`'s log (started at `t0`); fail with the end of
    its log when it exits or `timeout` passes. -> the seconds it took."""
    import time

    while "Application startup complete" not in c.logs().decode(errors="replace"):
        c.reload()
        if c.status == "exited" or time.time() - t0 > timeout:
            raise AssertionError(f"vLLM did not start ({c.status}):\n{c.logs().decode(errors='replace')[-4000:]}")
        time.sleep(0.5)
    c.reload()
    return time.time() - t0


def address(c) -> str:
    """The container's address on its (one) network."""
    return next(iter(c.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]


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
