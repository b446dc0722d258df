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


def test_smoke_train(docker_client, image, volumes):
    code, logs = finish(start(docker_client, volumes, "train", *SMOKE, "--name", "smoke"))
    assert code == 0, logs
    assert steps(volumes, "smoke") == list(range(1, 11))
    assert latest(volumes, "smoke") == "step_000010"
    assert verify_manifests(volumes["checkpoints"] / "smoke")
    assert not owned_by_me(volumes["checkpoints"], volumes["metrics"]), "files on the host not owned by the caller"


def test_stop_saves_within_grace_then_resume(docker_client, image, volumes):
    run, total = "stopped", 60
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


def test_kill_then_resume_from_last_periodic_checkpoint(docker_client, image, volumes):
    run, total, every = "killed", 60, 10
    c = start(docker_client, volumes, "train", *SMOKE, "--name", run, f"--train.max_steps={total}",
              f"--checkpoint.interval={every}", "--train.eval_interval=0")
    # past the second periodic checkpoint, with steps logged after it that the kill will lose
    wait_for(lambda: latest(volumes, run) == f"step_{2 * every:06d}" and len(steps(volumes, run)) >= 2 * every + 3,
             c, what="two periodic checkpoints")
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
    evaluator = dict(entrypoint=["python3", "-m", "trainer.evaluate"])
    for expected in (2, 0):  # step_000005 and step_000010, then nothing new after a restart
        c = docker_client.containers.run(IMAGE, ["--watch", "volumes/checkpoints", "--once"], detach=True,
                                         network_mode="none", user=me(), init=True, volumes=mounts(volumes),
                                         **evaluator)
        code, logs = finish(c)
        assert code == 0, logs[-2000:]
        assert f"stopped after {expected} new evaluation(s)" in logs, logs[-2000:]
    lines = (volumes["metrics"] / "evald" / "eval.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [5, 10]
    assert (volumes["metrics"] / "evald" / "loss.png").is_file()
    assert not owned_by_me(volumes["checkpoints"], volumes["metrics"])
