"""`vendor.py model`, `model --all` and `verify` against a Hugging Face Hub on loopback.

This machine (and the image's --network none) reaches no Hub, so `Hub` below is a real HTTP
server speaking the part of the Hub's protocol that huggingface_hub 2.x's model_info and
snapshot_download use, serving a tiny random Llama built here (test_hf_models' folder) next to
files a causal LM does not need (a pickled .bin, a .gguf, a README, a subfolder). vendor.py runs
as a user runs it, in a subprocess with HF_ENDPOINT pointing at that server, from a copy under
tmp so nothing of the repository's vendor/ is touched. This proves:

- a branch is pinned as the commit it resolves to, and only the causal LM's files are fetched,
  their sha256 in vendor/models.lock.json equal to what was served and to the folder's;
- `model --all` rebuilds a removed folder from the lock alone, and repairs a tampered one;
- a server that now serves a changed weight file at the pinned commit is refused in one line
  naming the file and both hashes, and the old folder and the lock stay as they were;
- `verify` (offline, standard library only) catches a changed, a missing and an extra file (exit 2);
- unknown repo, unknown revision, a gated repo without a token, a repo without safetensors and
  an unreachable Hub are each one line, no traceback, nothing written; HF_TOKEN opens the gated
  repo and is written nowhere;
- sharded weights come as the index and the shards it names (a stray consolidated file stays out),
  the folder loads with transformers from local files with the served model's logits, and
  `trainer train --model.type=hf --model.path=... --data.tokenizer=model` trains it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_cli
from tests.integration.test_hf_models import build_folder, hf_args

COMMIT = hashlib.sha1(b"tiny llama, first commit").hexdigest()
TOKEN = "hf_test_token_never_written"
# served beside the model; a causal LM needs none of them
NOT_NEEDED = {"pytorch_model.bin": b"pickle", "model.gguf": b"gguf", "README.md": b"# tiny\n",
              ".gitattributes": b"*.safetensors filter=lfs\n", "original/consolidated.safetensors": b"other"}


class Hub(ThreadingHTTPServer):
    """A Hub on 127.0.0.1: repos[repo_id] = {"refs": {branch: commit}, "commits": {commit: {path: bytes}},
    "token": the bearer token a gated repo wants, or None}."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repos: dict[str, dict] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


class HubHandler(BaseHTTPRequestHandler):
    """GET /api/models/{repo}/revision/{rev} (model_info: the commit sha and the file list),
    GET /api/models/{repo}/tree/{rev} (snapshot_download's listing), HEAD and GET
    /{repo}/resolve/{rev}/{path} (X-Repo-Commit, ETag, Content-Length, then the bytes); errors
    carry the X-Error-Code that huggingface_hub tells them apart by."""

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)", path):
            repo_id, kind, rev, file = m.group(1), m.group(2), m.group(3), None
        elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            repo_id, kind, rev, file = m.group(1), "resolve", m.group(2), m.group(3)
        else:
            return self.send(404, b"", body)
        repo = self.server.repos.get(repo_id)
        if repo is None:
            return self.error(401, "RepoNotFound", body)
        if repo["token"] and self.headers.get("Authorization") != f"Bearer {repo['token']}":
            return self.error(403, "GatedRepo", body)
        commit = rev if rev in repo["commits"] else repo["refs"].get(rev)
        if commit is None:
            return self.error(404, "RevisionNotFound", body)
        files = repo["commits"][commit]
        if kind == "revision":
            info = {"id": repo_id, "sha": commit, "private": False, "gated": "manual" if repo["token"] else False,
                    "siblings": [{"rfilename": f} for f in sorted(files)]}
            return self.send(200, json.dumps(info).encode(), body, {"Content-Type": "application/json"})
        if kind == "tree":
            tree = [{"type": "file", "path": f, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for f, data in sorted(files.items())]
            return self.send(200, json.dumps(tree).encode(), body, {"Content-Type": "application/json"})
        if file not in files:
            return self.error(404, "EntryNotFound", body)
        data = files[file]
        self.send(200, data, body, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                    "Content-Type": "application/octet-stream"})

    def error(self, status: int, code: str, body: bool) -> None:
        self.send(status, json.dumps({"error": code}).encode(), body, {"X-Error-Code": code, "X-Error-Message": code})

    def send(self, status: int, data: bytes, body: bool, headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return build_folder("llama", tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def hub(llama, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(llama).save_pretrained(sharded, max_shard_size="300KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(llama / name, sharded / name)
    server = Hub()
    model = folder_files(llama)
    server.repos = {
        "acme/Tiny-Llama": {"refs": {"main": COMMIT}, "commits": {COMMIT: {**model, **NOT_NEEDED}}, "token": None},
        "acme/tiny-sharded": {"refs": {"main": COMMIT}, "token": None,
                              "commits": {COMMIT: {**folder_files(sharded), "consolidated.safetensors": b"x"}}},
        "acme/gated": {"refs": {"main": COMMIT}, "commits": {COMMIT: model}, "token": TOKEN},
        "acme/pickles": {"refs": {"main": COMMIT}, "token": None,
                         "commits": {COMMIT: {"config.json": model["config.json"], "pytorch_model.bin": b"pickle"}}},
    }
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def vendor_dir(tmp_path) -> Path:
    """vendor.py alone in tmp/vendor, with its tool venv standing for this interpreter (the image's
    /opt/venv or the host's), which has huggingface_hub: tool_python() accepts a venv whose stamp
    is the sha256 of cpu.lock."""
    vendor = tmp_path / "vendor"
    venv_bin = vendor / ".tools" / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    shutil.copy2(ROOT / "vendor" / "vendor.py", vendor / "vendor.py")
    (vendor / "cpu.lock").write_text("# the tool venv is this test's interpreter\n")
    (venv_bin / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (venv_bin / "python").chmod(0o755)
    (vendor / ".tools" / "venv" / "lock.sha256").write_text(hashlib.sha256((vendor / "cpu.lock").read_bytes()).hexdigest())
    return vendor


def vendor_py(vendor: Path, *args: str, endpoint: str, **env: str) -> subprocess.CompletedProcess:
    """`python3 vendor/vendor.py ARGS` as a user runs it, against `endpoint`, with nothing of ~/.cache."""
    full = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT")}
    full.update({"HF_ENDPOINT": endpoint, "HF_HOME": str(vendor.parent / "hf-home"), "NO_PROXY": "127.0.0.1",
                 "HF_HUB_DISABLE_PROGRESS_BARS": "1", **env})
    return subprocess.run([sys.executable, str(vendor / "vendor.py"), *args], env=full, text=True,
                          capture_output=True, timeout=120)


def one_line(proc) -> str:
    """The refusal: a non-zero exit and exactly one line on stderr, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vendor: "), proc.stderr
    return lines[0]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_branch_is_pinned_as_its_commit_and_all_rebuilds_from_the_lock(hub, llama, vendor_dir):
    got = vendor_py(vendor_dir, "model", "acme/Tiny-Llama", "--revision", "main", endpoint=hub.url)
    assert got.returncode == 0, got.stdout + got.stderr
    assert f"main resolves to commit {COMMIT}; pinning that commit" in got.stdout
    served = folder_files(llama)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(served)
    pins = json.loads((vendor_dir / "models.lock.json").read_text())
    assert pins == {"tiny-llama": {"repo": "acme/Tiny-Llama", "revision": COMMIT,
                                   "files": {f: sha(data) for f, data in served.items()}}}
    folder = vendor_dir / "models" / "tiny-llama"
    assert folder_files(folder) == served  # nothing of NOT_NEEDED, no .cache, no SOURCE
    assert [p.name for p in vendor_dir.iterdir() if p.name.startswith(".model-")] == []
    assert vendor_py(vendor_dir, "verify", endpoint=hub.url).returncode == 0

    again = vendor_py(vendor_dir, "model", "--all", endpoint=hub.url)
    assert again.returncode == 0 and "matches its pin" in again.stdout, again.stdout + again.stderr
    shutil.rmtree(folder)
    rebuilt = vendor_py(vendor_dir, "model", "--all", endpoint=hub.url)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert folder_files(folder) == served
    assert json.loads((vendor_dir / "models.lock.json").read_text()) == pins


def test_a_changed_file_at_the_pinned_commit_is_refused(hub, vendor_dir):
    assert vendor_py(vendor_dir, "model", "acme/Tiny-Llama", endpoint=hub.url).returncode == 0
    folder = vendor_dir / "models" / "tiny-llama"
    before, lock = folder_files(folder), (vendor_dir / "models.lock.json").read_text()
    files = hub.repos["acme/Tiny-Llama"]["commits"][COMMIT]
    good = files["model.safetensors"]
    files["model.safetensors"] = good[:-1] + bytes([good[-1] ^ 1])  # same commit, one bit changed
    try:
        line = one_line(vendor_py(vendor_dir, "model", "acme/Tiny-Llama", "--revision", "main", endpoint=hub.url))
        assert "model.safetensors" in line and sha(files["model.safetensors"]) in line and sha(good) in line, line
        assert "nothing replaced" in line
    finally:
        files["model.safetensors"] = good
    assert folder_files(folder) == before and (vendor_dir / "models.lock.json").read_text() == lock
    assert [p.name for p in vendor_dir.iterdir() if p.name.startswith(".model-")] == []


def test_verify_catches_a_changed_missing_or_extra_file(hub, vendor_dir):
    assert vendor_py(vendor_dir, "model", "acme/Tiny-Llama", endpoint=hub.url).returncode == 0
    folder = vendor_dir / "models" / "tiny-llama"
    pins = json.loads((vendor_dir / "models.lock.json").read_text())["tiny-llama"]["files"]
    offline = "http://127.0.0.1:9"  # verify needs no Hub

    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    changed = vendor_py(vendor_dir, "verify", endpoint=offline)
    assert changed.returncode == 2, changed.stderr
    assert "vendor/models/tiny-llama/model.safetensors has sha256" in changed.stderr
    assert sha(weights.read_bytes()) in changed.stderr and pins["model.safetensors"] in changed.stderr
    repaired = vendor_py(vendor_dir, "model", "--all", endpoint=hub.url)  # refetched: it did not match
    assert repaired.returncode == 0 and weights.read_bytes() == good, repaired.stdout + repaired.stderr

    (folder / "tokenizer.json").unlink()
    missing = vendor_py(vendor_dir, "verify", endpoint=offline)
    assert missing.returncode == 2 and "vendor/models/tiny-llama/tokenizer.json is missing" in missing.stderr
    assert vendor_py(vendor_dir, "model", "--all", endpoint=hub.url).returncode == 0

    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    extra = vendor_py(vendor_dir, "verify", endpoint=offline)
    assert extra.returncode == 2 and "vendor/models/tiny-llama/pytorch_model.bin is not in its pin" in extra.stderr
    assert len(extra.stderr.strip().splitlines()) == 1 and "Traceback" not in extra.stderr


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["unknown repo", "unknown revision", "gated", "pickles only", "unreachable"])
def test_hub_errors_are_one_line(hub, vendor_dir, case):
    args, endpoint, expect = {
        "unknown repo": (["acme/nope"], hub.url, "no model repo acme/nope on"),
        "unknown revision": (["acme/Tiny-Llama", "--revision", "v9"], hub.url, "acme/Tiny-Llama has no revision 'v9'"),
        "gated": (["acme/gated"], hub.url, "acme/gated is gated; accept its terms"),
        "pickles only": (["acme/pickles"], hub.url, "has no model.safetensors or model.safetensors.index.json "
                                                    "(it has pytorch_model.bin)"),
        "unreachable": (["acme/Tiny-Llama"], f"http://127.0.0.1:{closed_port()}",
                        "did not answer (ConnectError"),
    }[case]
    line = one_line(vendor_py(vendor_dir, "model", *args, endpoint=endpoint))
    assert expect in line, line
    if case == "unreachable":
        assert line.endswith("vendor online and copy vendor/models/tiny-llama plus vendor/models.lock.json here")
    assert not (vendor_dir / "models").exists() and not (vendor_dir / "models.lock.json").exists()


def test_hf_token_opens_a_gated_repo_and_is_written_nowhere(hub, vendor_dir):
    got = vendor_py(vendor_dir, "model", "acme/gated", "--name", "gated", endpoint=hub.url, HF_TOKEN=TOKEN)
    assert got.returncode == 0, got.stdout + got.stderr
    assert TOKEN not in got.stdout + got.stderr
    written = [p for p in vendor_dir.parent.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert written == []
    assert json.loads((vendor_dir / "models.lock.json").read_text())["gated"]["repo"] == "acme/gated"


def test_sharded_model_loads_and_trains(hub, llama, vendor_dir, corpus_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    got = vendor_py(vendor_dir, "model", "acme/tiny-sharded", "--name", "sharded", endpoint=hub.url)
    assert got.returncode == 0, got.stdout + got.stderr
    folder = vendor_dir / "models" / "sharded"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    files = set(json.loads((vendor_dir / "models.lock.json").read_text())["sharded"]["files"])
    assert files == {p.name for p in folder.iterdir()}
    assert shards < files and "consolidated.safetensors" not in files

    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        vendored = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()(ids).logits
        served = AutoModelForCausalLM.from_pretrained(llama, local_files_only=True).eval()(ids).logits
    assert torch.equal(vendored, served)

    run_cli(["train", *hf_args(corpus_dir, tmp_path, "vendored", folder, **{
        "train.max_steps": 2, "train.eval_interval": 2, "checkpoint.interval": 2, "train.log_interval": 1,
        "train.warmup_steps": 1})], cwd=tmp_path)
    assert (tmp_path / "volumes" / "checkpoints" / "vendored" / "final" / "config.json").is_file()
