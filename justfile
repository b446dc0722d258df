# Airlock's user interface. Every recipe is a thin call of `trainer` (inside the offline
# container) or of docker. Variables go before the recipe name:
#     just train                                  the main job (configs/default.yaml), CPU image
#     just config=configs/smoke.yaml train        another config
#     just variant=cuda train                     the CUDA image and a GPU
#     just run=NAME resume                        a given run; extra arguments go to `trainer`
#     just train --train.max_steps=50             (overrides, as `trainer train` takes them)

set shell := ["bash", "-euo", "pipefail", "-c"]

variant := env("AIRLOCK_VARIANT", "cpu")           # cpu | cuda
config := env("AIRLOCK_CONFIG", "configs/default.yaml")
run := env("AIRLOCK_RUN", "")                      # run name for resume/sample/evaluate ("" = newest)
image := "airlock:" + variant
service := if variant == "cuda" { "trainer-cuda" } else { "trainer" }
profile := if variant == "cuda" { "--profile cuda" } else { "" }
run_flag := if run == "" { "" } else { "--run " + run }

# containers run as you, so the files they write under volumes/ and data/ are yours
export AIRLOCK_UID := `id -u`
export AIRLOCK_GID := `id -g`

# list the recipes
default:
    @just --list --unsorted

# regenerate vendor/cpu.lock and vendor/cuda.lock from vendor/requirements.in (online)
lock:
    python3 vendor/vendor.py lock cpu
    python3 vendor/vendor.py lock cuda

# fill vendor/ for a variant: wheels, GPT-2 tokenizer and weights, MANIFEST.json (add --fixture offline)
vendor var=variant *flags:
    python3 vendor/vendor.py all {{var}} {{flags}}

# build a Python 3.11 base image from Debian packages, for hosts with no registry
base-image:
    scripts/base-image.sh airlock-base:bookworm

# build the image for `variant` with the network disabled, from vendor/ only
build: _vendored
    docker build --network none \
        --build-arg BASE_IMAGE="$(scripts/base-image.sh --pick)" \
        --build-arg VARIANT={{variant}} \
        --build-arg GIT_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
        --build-arg LOCK_SHA256="$(sha256sum vendor/{{variant}}.lock | cut -d' ' -f1)" \
        --build-arg MANIFEST_SHA256="$(sha256sum vendor/MANIFEST.json | cut -d' ' -f1)" \
        -t {{image}} .

# train `config` in the offline container (builds what is missing first); extra args go to trainer
train *args: _ready
    docker compose run --rm {{service}} train --config {{config}} {{args}}

# continue the newest valid checkpoint of `run` (default: the most recent run)
resume *args: _ready
    docker compose run --rm {{service}} resume {{run_flag}} {{args}}

# LoRA fine-tuning of the vendored GPT-2 (configs/gpt2_lora.yaml)
finetune *args: _ready
    docker compose run --rm {{service}} train --config configs/gpt2_lora.yaml {{args}}

# GRPO against the generation server on the internal network (the server starts first)
grpo *args: _ready
    docker compose {{profile}} run --rm grpo grpo --config configs/grpo_server.yaml --resume auto {{args}}

# GRPO trainer + generation server + evaluator (`just variant=cuda up` adds vLLM)
up *args: _ready
    docker compose {{profile}} up {{args}}

# evaluate a checkpoint once (default: the newest of `run`); --watch DIR follows a run
evaluate *args: _ready
    docker compose run --rm evaluator {{run_flag}} {{args}}

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

# every test but the container ones, inside the image with --network none
test-image *args:
    docker run --rm --network none --user "$AIRLOCK_UID:$AIRLOCK_GID" --entrypoint python3 {{image}} \
        -m pytest -p no:cacheprovider -q -m "not container" tests {{args}}

# container tests (docker SDK, marker `container`): smoke, stop/kill + resume, ownership, compose
test-container *args: _tools
    AIRLOCK_IMAGE={{image}} PYTHONPATH=. vendor/.tools/venv/bin/python -m pytest -p no:cacheprovider \
        -m container tests/container -v {{args}}

# CI: build with --network none, then train/stop/kill/resume/ownership and the suite in containers
verify-offline: build test-container test-image

# write dist/airlock-images.tar.gz (+ .sha256) with the built image(s), for an air-gapped host
save:
    mkdir -p dist
    docker save $(docker image ls --format '{{{{.Repository}}:{{{{.Tag}}' airlock | grep -E '^airlock:(cpu|cuda)$') \
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
    [ -f vendor/MANIFEST.json ] && [ -d vendor/wheels/{{variant}} ] || python3 vendor/vendor.py all {{variant}} --fixture

# image built and host folders present (the image's prepared corpora are read in place)
[private]
_ready:
    docker image inspect {{image}} >/dev/null 2>&1 || just variant={{variant}} build
    mkdir -p volumes/checkpoints volumes/metrics data/prepared

# the host-side tool venv (pytest, docker SDK) that vendor.py installs from the wheelhouse
[private]
_tools: _vendored
    [ -x vendor/.tools/venv/bin/python ]
