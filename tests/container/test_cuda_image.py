"""The CUDA image (airlock:cuda) on a host with no GPU, for real (issue 10, item 1): with no
network its `trainer doctor` passes and reports the CUDA build of torch with no device; every
CUDA library the trainer's GPU paths open (cuBLAS, cuDNN and its engines, NCCL for DDP, NVRTC,
the lazily loaded cuSOLVER) and triton load without a GPU; triton builds its CUDA launcher with the
image's gcc and Python.h (what run.compile needs on a GPU); configs/smoke.yaml trains on CPU to the
same weights sha256 and losses as in the CPU image; `just save` selects the image, and a docker
save/load round trip of it gives back the same image id.

Skips, with the reason, when airlock:cuda is not built: CI builds only the CPU images.
`just verify-cuda` builds what is missing and runs this file (about 3 minutes on 2 cores, most
of it the 5.5 GB save and load). Needs a Docker daemon."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import time

import pytest

from conftest import ROOT, TRITON_PROBE, TRITON_PROBE_ENV, check_triton_probe, me

pytestmark = pytest.mark.container

CUDA_IMAGE = os.environ.get("AIRLOCK_CUDA_IMAGE", "airlock:cuda")
CPU_IMAGE = os.environ.get("AIRLOCK_CPU_IMAGE", "airlock:cpu")
SMOKE = ["--config", "configs/smoke.yaml"]

# Run in the image: what the trainer's GPU paths load, opened without a GPU. torch preloads its
# CUDA libraries from the nvidia wheels (required: a missing one raises); cuDNN opens its engine
# libraries and torch its cuSOLVER wrapper only on first use, so they are opened here by hand.
LIBRARIES = """
import ctypes, glob, json, os, torch
torch._preload_cuda_deps()
site = os.path.dirname(os.path.dirname(torch.__file__))
lazy = sorted(glob.glob(site + "/nvidia/cudnn/lib/libcudnn*.so.*")) + [site + "/torch/lib/libtorch_cuda_linalg.so"]
for path in lazy:
    ctypes.CDLL(path)
import torch.distributed as dist
import triton
from triton.backends.nvidia import compiler
torch.zeros(1)
print(json.dumps({"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                  "nccl": dist.is_nccl_available(), "triton": triton.__version__,
                  "devices": torch.cuda.device_count(), "lazy": len(lazy)}))
"""


def _get(client, name: str, how: str):
    import docker

    try:
        return client.images.get(name)
    except docker.errors.ImageNotFound:
        pytest.skip(f"image {name} is not built; {how}")


@pytest.fixture(scope="module")
def cuda_image(docker_client):
    return _get(docker_client, CUDA_IMAGE, "`just verify-cuda` builds it (`just vendor cuda`, then "
                                           "`just variant=cuda build-trainer`: about 10 minutes and 5.5 GB); "
                                           "CI builds only the CPU images")


@pytest.fixture(scope="module")
def cpu_image(docker_client):
    return _get(docker_client, CPU_IMAGE, "run `just build`")


def run(client, image, args, tmp_path, entrypoint=None, env=None) -> tuple[int, str]:
    """One container with no network, as the caller, with fresh checkpoint/metrics folders."""
    host = {name: tmp_path / name for name in ("checkpoints", "metrics")}
    for p in host.values():
        p.mkdir(parents=True, exist_ok=True)
    c = client.containers.run(image.id, list(args), detach=True, network_mode="none", user=me(), init=True,
                              entrypoint=entrypoint, environment=env or {},
                              volumes={str(p): {"bind": f"/app/volumes/{n}", "mode": "rw"} for n, p in host.items()})
    try:
        code = c.wait(timeout=600)["StatusCode"]
        return code, c.logs().decode(errors="replace")
    finally:
        c.remove(force=True)


def test_it_is_the_cuda_build(cuda_image):
    labels, env = cuda_image.attrs["Config"]["Labels"], cuda_image.attrs["Config"]["Env"]
    assert labels.get("airlock.variant") == "cuda"
    assert "AIRLOCK_IMAGE_VARIANT=cuda" in env


def test_doctor_passes_without_network_and_sees_no_gpu(docker_client, cuda_image, tmp_path):
    code, logs = run(docker_client, cuda_image, ["doctor", *SMOKE], tmp_path)
    assert code == 0, logs
    assert re.search(r"torch \S+\+cu\d+", logs), f"not torch's CUDA build:\n{logs}"
    assert "device: cpu (" in logs, f"a CUDA device where none was given:\n{logs}"
    assert "needs no network" in logs, logs


def test_cuda_libraries_load_without_a_gpu(docker_client, cuda_image, tmp_path):
    code, logs = run(docker_client, cuda_image, ["-c", LIBRARIES], tmp_path, entrypoint=["python3"])
    assert code == 0, logs
    got = json.loads(logs.strip().splitlines()[-1])
    print(f"airlock:cuda without a GPU: {got}")
    assert got["cuda"] and got["cudnn"] and got["nccl"] and got["devices"] == 0, got
    assert got["lazy"] >= 5, got  # libcudnn, its graph/ops/engines/... libraries, the cuSOLVER wrapper


def test_torch_compiles_toolchain_builds_tritons_launcher_without_a_gpu(docker_client, cuda_image, tmp_path):
    """run.compile on a GPU: Inductor emits Triton kernels, and Triton builds its CUDA launcher with
    the image's gcc and Python.h before the first one runs (scripts/install-debs.sh)."""
    code, logs = run(docker_client, cuda_image, TRITON_PROBE, tmp_path, entrypoint=["sh"], env=TRITON_PROBE_ENV)
    check_triton_probe(code, logs)


def _smoke(client, image, tmp_path) -> tuple[dict, list[tuple], float]:
    """-> (summary.json, (step, loss, val loss, grad norm) per step, seconds) of a smoke run."""
    t0 = time.time()
    code, logs = run(client, image, ["train", *SMOKE, "--name", "smoke"], tmp_path)
    took = time.time() - t0
    assert code == 0, logs
    metrics = tmp_path / "metrics" / "smoke"
    summary = json.loads((metrics / "summary.json").read_text())
    rows = [json.loads(line) for line in (metrics / "metrics.jsonl").read_text().splitlines()]
    return summary, [(r["step"], r["loss"], r["val_loss"], r["grad_norm"]) for r in rows], took


def test_smoke_trains_on_cpu_to_the_cpu_images_weights(docker_client, cuda_image, cpu_image, tmp_path):
    cuda, cuda_losses, cuda_s = _smoke(docker_client, cuda_image, tmp_path / "cuda")
    cpu, cpu_losses, cpu_s = _smoke(docker_client, cpu_image, tmp_path / "cpu")
    print(f"smoke: airlock:cuda {cuda_s:.1f} s, airlock:cpu {cpu_s:.1f} s, weights sha256 {cuda['weights_sha256']}")
    assert cuda["step"] == cpu["step"] == 10
    assert cuda_losses == cpu_losses and len(cuda_losses) == 10  # every step's loss, val loss and grad norm
    assert cuda["weights_sha256"] == cpu["weights_sha256"]


def test_save_selects_it_and_a_save_load_round_trip_keeps_it(docker_client, cuda_image, tmp_path):
    """`just save`'s image list, as the recipe computes it, holds the image. Its gzip and `just
    load`'s sha256 check and gunzip add minutes for 5.5 GB (README, The CUDA image), so the
    round trip here is the plain `docker save` / `docker load` they wrap."""
    if not shutil.which("just"):
        pytest.skip("`just` is not installed (scripts/bootstrap.sh installs it)")
    recipe = subprocess.run(["just", "--show", "save"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    pattern = re.search(r"grep -E '([^']+)'", recipe).group(1)
    listed = subprocess.run(["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert CUDA_IMAGE in [name for name in listed if re.search(pattern, name)], (pattern, listed)

    tar = tmp_path / "airlock-cuda.tar"  # 5.5 GB: removed at the end, pytest keeps its temp folders
    try:
        t0 = time.time()
        subprocess.run(["docker", "save", "-o", str(tar), CUDA_IMAGE], check=True)
        saved_s, size = time.time() - t0, tar.stat().st_size
        with tarfile.open(tar) as t:
            manifest = json.load(t.extractfile("manifest.json"))
            names = set(t.getnames())
        assert manifest[0]["RepoTags"] == [CUDA_IMAGE]
        assert all(layer in names for layer in manifest[0]["Layers"]), "a layer is missing from the tar"
        t0 = time.time()
        out = subprocess.run(["docker", "load", "-i", str(tar)], capture_output=True, text=True, check=True).stdout
        loaded_s = time.time() - t0
    finally:
        tar.unlink(missing_ok=True)
    print(f"docker save {size / 1e9:.2f} GB in {saved_s:.0f} s, docker load in {loaded_s:.0f} s")
    assert f"Loaded image: {CUDA_IMAGE}" in out, out
    assert docker_client.images.get(CUDA_IMAGE).id == cuda_image.id
