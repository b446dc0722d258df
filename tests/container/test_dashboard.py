"""The dashboard, for real: two short runs trained in the image with --network none, then the
compose `dashboard` service (TensorBoard from the same offline image) serving their metrics
folder. TensorBoard's own HTTP data API holds each run's train/loss and val/loss at exactly the
steps and values of its metrics.csv; headless Chromium (Debian's package) loads the page, whose
rendered DOM names both runs, and its screenshot is kept as a test artefact
($AIRLOCK_TEST_ARTIFACTS, default build/test-artifacts/dashboard.png). The service publishes on
the host's 127.0.0.1 only, runs as a non-root user on a read-only root filesystem with the
metrics mounted read-only, and cannot reach outside (no connection, no name lookup).
Skips with the reason when Docker, compose, the image or Chromium is missing."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import IMAGE, ROOT, me, mounts

pytestmark = pytest.mark.container

RUNS = {"dash-a": 1337, "dash-b": 7}
ARTIFACTS = Path(os.environ.get("AIRLOCK_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts"))


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "chromium-headless-shell"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("Debian's chromium is not installed (apt-get install chromium; `scripts/bootstrap.sh test` "
                "installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def csv_points(metrics_dir: Path, column: str) -> list[tuple[int, float]]:
    with open(metrics_dir / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r[column])) for r in csv.DictReader(f) if r[column]]


def browser(binary: str, profile: Path, budget_ms: int, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a page: the page's scripts run for budget_ms of virtual time."""
    flags = ["--headless", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,1000",
             f"--virtual-time-budget={budget_ms}", f"--user-data-dir={profile}"]
    if os.getuid() == 0:
        flags.append("--no-sandbox")  # Chromium's sandbox refuses to run as root
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


def rendered(binary: str, profile: Path, url: str, expected: list[str], lines: int, shot: Path) -> str:
    """The DOM of the page once it shows every expected text and draws `lines` chart lines (SVG
    paths of class "line"), then its screenshot. On a busy
    host the app may not have booted within one budget: up to 4 loads, each given longer."""
    from PIL import Image

    dom = None
    for budget in (10_000, 20_000, 40_000, 60_000):
        dom = browser(binary, profile, budget, "--dump-dom", url)
        if dom.returncode == 0 and all(text in dom.stdout for text in expected) and \
                dom.stdout.count('class="line"') >= lines:
            break
        print(f"the page was not drawn within {budget} ms of virtual time: loading it again")
    else:
        raise AssertionError(f"the page never showed {expected} and {lines} lines (exit {dom.returncode}):\n{dom.stdout[-1500:]}"
                             f"\n{dom.stderr[-1500:]}")
    for budget in (budget, 2 * budget, 4 * budget):  # the same budget the DOM needed, then more
        shot.unlink(missing_ok=True)
        taken = browser(binary, profile, budget, f"--screenshot={shot}", url)
        if taken.returncode == 0 and shot.is_file():
            with Image.open(shot) as img:
                if img.size == (1400, 1000) and len(img.convert("RGB").getcolors(1 << 20) or []) > 50:
                    return dom.stdout  # not a blank page
    raise AssertionError(f"no screenshot with content: {taken.stderr[-2000:]}")


def test_dashboard_in_a_real_browser(docker_client, image, volumes, tmp_path):
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    binary = chromium()
    train = " && ".join(f"trainer train --config configs/smoke.yaml --name {name} --run.seed={seed} "
                        "--train.export_at_end=false" for name, seed in RUNS.items())
    c = docker_client.containers.run(IMAGE, ["-c", train], entrypoint=["sh"], detach=True, network_mode="none",
                                     user=me(), init=True, volumes=mounts(volumes))
    code = c.wait(timeout=600)["StatusCode"]
    logs = c.logs().decode(errors="replace")
    c.remove(force=True)
    assert code == 0, logs[-3000:]

    port = free_port()
    project = f"airlock-dash-{os.getpid()}"
    env = {**os.environ, "AIRLOCK_METRICS_DIR": str(volumes["metrics"]), "AIRLOCK_DASHBOARD_PORT": str(port),
           "AIRLOCK_DASHBOARD_IMAGE": IMAGE, "AIRLOCK_DASHBOARD_USER": "1000:1000"}
    compose = ["docker", "compose", "-p", project, "-f", str(ROOT / "docker-compose.yml"), "--profile", "dashboard"]

    def run(*args, timeout=300):
        return subprocess.run(compose + list(args), cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)

    base = f"http://127.0.0.1:{port}"
    try:
        r = run("up", "-d", "dashboard")
        assert r.returncode == 0, r.stdout + r.stderr
        container = docker_client.containers.get(f"{project}-dashboard-1")

        # TensorBoard's own data API: every run, and each point of metrics.csv at its step
        def scalars(run_name: str, tag: str) -> list[tuple[int, float]]:
            query = urllib.parse.urlencode({"run": run_name, "tag": tag})
            return [(step, value) for _, step, value in get(f"{base}/data/plugin/scalars/scalars?{query}")]

        deadline, last = time.time() + 120, None
        while time.time() < deadline:
            try:
                if set(RUNS) <= set(get(f"{base}/data/runs")) and \
                        all(len(scalars(name, "train/loss")) == 10 for name in RUNS):
                    break
            except (OSError, ValueError) as e:
                last = e
            container.reload()
            assert container.status == "running", container.logs().decode()[-3000:]
            time.sleep(1)
        else:
            raise AssertionError(f"TensorBoard did not serve both runs in 120 s ({last}):\n"
                                 f"{container.logs().decode()[-3000:]}")
        for name in RUNS:
            metrics_dir = volumes["metrics"] / name
            for tag, column in (("train/loss", "loss"), ("val/loss", "val_loss"), ("train/lr", "lr")):
                got, want = scalars(name, tag), csv_points(metrics_dir, column)
                assert [s for s, _ in got] == [s for s, _ in want], (name, tag, got)
                assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), (name, tag)
        assert [s for s, _ in scalars("dash-a", "val/loss")] == [5, 10]

        # a real browser: the page renders both runs; the screenshot is the artefact
        # the loss charts (train/loss, val/loss) of both runs, drawn as SVG (class "line"): headless
        # Chromium has no GPU for TensorBoard's WebGL lines, which then come and go with the timing
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        rendered(binary, tmp_path / "chromium", f"{base}/?tagFilter=loss&forceSVG=true#timeseries",
                 [*RUNS, "train/loss", "val/loss"], 2 * len(RUNS), shot)
        print(f"dashboard screenshot: {shot}")

        # published on loopback only, non-root, read-only, no way out
        attrs = container.attrs
        bindings = attrs["NetworkSettings"]["Ports"]["6006/tcp"]
        assert [b["HostIp"] for b in bindings] == ["127.0.0.1"], bindings
        assert attrs["Config"]["User"] == "1000:1000" and attrs["HostConfig"]["ReadonlyRootfs"]
        assert [m["RW"] for m in attrs["Mounts"] if m["Destination"] == "/app/volumes/metrics"] == [False]
        probe = ("import socket\n"
                 "for what, call in (('connect', lambda: socket.create_connection(('1.1.1.1', 53), timeout=4)),\n"
                 "                   ('lookup', lambda: socket.getaddrinfo('pypi.org', 443))):\n"
                 "    try:\n        call()\n        print(what, 'REACHED')\n"
                 "    except OSError as e:\n        print(what, 'blocked', e)\n"
                 "try:\n    open('/app/x', 'w')\n    print('rootfs WRITABLE')\n"
                 "except OSError:\n    print('rootfs read-only')\n")
        code, out = container.exec_run(["python3", "-c", probe])
        out = out.decode()
        assert code == 0 and "REACHED" not in out and "WRITABLE" not in out, out
        assert "connect blocked" in out and "lookup blocked" in out and "rootfs read-only" in out, out
    finally:
        run("down", "--remove-orphans", timeout=120)
