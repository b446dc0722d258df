"""The vLLM CUDA image (airlock-vllm:cuda, Dockerfile.vllm with VARIANT=vllm-cuda) on a host with
no GPU: what can be proven without one. With no network it imports vLLM and PyTorch's CUDA build;
the OpenAI server's `--help` exits 0 and its parser takes the image's own entrypoint + command;
the baked GPT-2 folder loads offline; the offline and no-usage-stats variables are set and the
user is not root; Triton's CUDA launcher (driver.c, which Triton compiles with a C compiler and
Python.h before its first kernel on a GPU) compiles and loads with the image's gcc, and a Triton
kernel compiles to a cubin for an H100 (sm_90a); a server started without a GPU exits at start-up.

vLLM 0.32 builds its argument parser's defaults from the detected platform, and with no GPU it
detects none: the parser itself raises "Failed to infer device type". The two parser tests set
VLLM_TARGET_DEVICE=cpu, which selects vLLM's CPU platform for the defaults only.

Not proven here: serving on a GPU. Skips, with the reason, when the image is not built: CI builds
only the CPU images. `just verify-vllm-cuda` builds it where missing and runs this file (about
1 minute once built). Needs a Docker daemon."""

from __future__ import annotations

import json
import os
import time

import pytest

from conftest import TRITON_PROBE, TRITON_PROBE_ENV, check_triton_probe, last_json, me

pytestmark = pytest.mark.container

IMAGE = os.environ.get("AIRLOCK_VLLM_CUDA_IMAGE", "airlock-vllm:cuda")

VERSIONS = """
import json, importlib.util, vllm, torch, triton
print(json.dumps({"vllm": vllm.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
                  "triton": triton.__version__, "devices": torch.cuda.device_count(),
                  "torchvision": importlib.util.find_spec("torchvision") is not None}))
"""

# the server's own parser on an argument vector, as api_server's main() runs it, without serving
PARSE = """
import json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser
args = make_arg_parser(FlexibleArgumentParser()).parse_args(json.loads(sys.argv[1]))
validate_parsed_serve_args(args)
print(json.dumps({k: getattr(args, k) for k in ("model", "served_model_name", "dtype", "enforce_eager",
                                                "enable_chunked_prefill", "host", "port")}))
"""
NO_GPU_PARSER = {"VLLM_TARGET_DEVICE": "cpu"}  # see the module docstring

GPT2 = """
import json
from transformers import AutoConfig, AutoTokenizer
cfg = AutoConfig.from_pretrained("/models/gpt2", local_files_only=True)
tok = AutoTokenizer.from_pretrained("/models/gpt2", local_files_only=True)
print(json.dumps({"model_type": cfg.model_type, "vocab": cfg.vocab_size, "head_dim": cfg.n_embd // cfg.n_head,
                  "ids": tok("Hello world")["input_ids"]}))
"""

@pytest.fixture(scope="module")
def cuda_server_image(docker_client):
    import docker

    try:
        img = docker_client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.skip(f"image {IMAGE} is not built; `just verify-vllm-cuda` builds it (`just vendor vllm-cuda`, "
                    "then `just variant=cuda build-server`: 3.9 GB of wheels, about 10 minutes); "
                    "CI builds only the CPU images")
    if img.attrs["Config"]["Labels"].get("airlock.variant") != "vllm-cuda":
        pytest.skip(f"{IMAGE} is not the vLLM CUDA build (label airlock.variant="
                    f"{img.attrs['Config']['Labels'].get('airlock.variant')!r})")
    return img


def run(client, image, args, entrypoint=None, env=None, timeout=600) -> tuple[int, str]:
    """One container with no network and no GPU, as the caller (compose runs it so)."""
    c = client.containers.run(image.id, list(args), detach=True, network_mode="none", user=me(), init=True,
                              entrypoint=entrypoint, environment=env or {}, shm_size="1g")
    try:
        code = c.wait(timeout=timeout)["StatusCode"]
        return code, c.logs().decode(errors="replace")
    finally:
        c.remove(force=True)


def test_image_is_offline_non_root_and_labelled(cuda_server_image):
    cfg = cuda_server_image.attrs["Config"]
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert cfg["Labels"].get("airlock.variant") == "vllm-cuda" and env.get("AIRLOCK_IMAGE_VARIANT") == "vllm-cuda"
    assert cfg["Entrypoint"][:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert "/models/gpt2" in cfg["Cmd"]
    assert cfg["User"] and cfg["User"].split(":")[0] not in ("0", "root")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
                "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK"):
        assert env.get(var) == "1", var
    for label in ("airlock.lock.sha256", "airlock.vendor.manifest.sha256", "org.opencontainers.image.revision"):
        assert cfg["Labels"].get(label), label


def test_vllm_and_torch_cuda_build_import_without_network_or_gpu(docker_client, cuda_server_image):
    code, logs = run(docker_client, cuda_server_image, ["-c", VERSIONS], entrypoint=["python3"])
    assert code == 0, logs[-3000:]
    got = last_json(logs)
    print(f"{IMAGE}: {got}")
    assert got["vllm"].startswith("0.32") and got["torch"].startswith("2.13.0"), got
    assert got["cuda"] and got["cuda"].startswith("13"), got  # PyTorch's CUDA 13 build, as vLLM's wheel
    assert got["devices"] == 0 and not got["torchvision"], got


def test_runs_as_a_non_root_user_by_default(docker_client, cuda_server_image):
    c = docker_client.containers.run(cuda_server_image.id, ["-u"], entrypoint=["id"], detach=True, network_mode="none")
    try:
        c.wait(timeout=60)
        assert c.logs().decode().strip() == "1000"
    finally:
        c.remove(force=True)


def test_server_help_exits_0(docker_client, cuda_server_image):
    """`--help` through the image's entrypoint (after its own flags)."""
    code, logs = run(docker_client, cuda_server_image, ["--help"], env=NO_GPU_PARSER)
    assert code == 0, logs[-3000:]
    assert "--model" in logs and "--enforce-eager" in logs and "--gpu-memory-utilization" in logs


def test_server_parses_the_images_arguments(docker_client, cuda_server_image):
    """The whole baked argument vector (entrypoint flags + command), parsed and validated: `--help`
    alone exits before argparse would report an unknown flag."""
    cfg = cuda_server_image.attrs["Config"]
    argv = cfg["Entrypoint"][3:] + cfg["Cmd"]
    code, logs = run(docker_client, cuda_server_image, ["-c", PARSE, json.dumps(argv)], entrypoint=["python3"],
                     env=NO_GPU_PARSER)
    assert code == 0, logs[-3000:]
    got = last_json(logs)
    assert got == {"model": "/models/gpt2", "served_model_name": ["gpt2"], "dtype": "float32", "enforce_eager": True,
                   "enable_chunked_prefill": False, "host": "0.0.0.0", "port": 8000}, got


def test_baked_gpt2_loads_offline(docker_client, cuda_server_image):
    code, logs = run(docker_client, cuda_server_image, ["-c", GPT2], entrypoint=["python3"])
    assert code == 0, logs[-3000:]
    got = last_json(logs)
    assert got["model_type"] == "gpt2" and got["vocab"] == 50257 and got["head_dim"] == 64, got
    assert got["ids"] == [15496, 995], got


def test_triton_builds_its_cuda_launcher_and_a_kernel_without_a_gpu(docker_client, cuda_server_image):
    code, logs = run(docker_client, cuda_server_image, TRITON_PROBE, entrypoint=["sh"], env=TRITON_PROBE_ENV)
    check_triton_probe(code, logs)


def test_server_without_a_gpu_stops_at_start_up(docker_client, cuda_server_image):
    """As compose runs it (its entrypoint and command), minus the GPU: it exits 1 within seconds,
    not hanging. What it says is vLLM's: a 25-line traceback from building the argument parser,
    whose last line is "RuntimeError: Failed to infer device type, please set the environment
    variable `VLLM_LOGGING_LEVEL=DEBUG` ...", with no word of a GPU."""
    t0 = time.time()
    code, logs = run(docker_client, cuda_server_image, [], timeout=300)
    took = time.time() - t0
    last = logs.strip().splitlines()[-1] if logs.strip() else ""
    print(f"{IMAGE} without a GPU: exit {code} after {took:.0f} s, {len(logs.splitlines())} lines; last: {last}")
    assert code != 0, logs[-3000:]
    assert "Failed to infer device type" in last, logs[-3000:]
