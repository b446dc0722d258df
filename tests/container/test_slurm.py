"""deploy/slurm/train.sbatch under a real SLURM: Debian's slurm-wlm 22.05 and munge, a one-node
cluster (tests/slurm/cluster.sh) in a container around the Airlock image, on an internal network
(no route out). Every job is submitted with `sbatch` from a folder outside the project, trains 2
processes on the smoke config, and is judged by SLURM's own job state and the weights sha256:

- a reference job is COMPLETED 0:0 and logs to <project>/volumes/slurm/, not the submit folder;
- `scancel --signal=TERM` saves once and ends COMPLETED 0:0 (every process of the step gets the
  signal, and the launcher forwards its copy: one stop, no "second SIGTERM"); the resubmitted
  job finishes with the reference sha and every step logged once;
- `scontrol requeue` re-runs the job, which continues to the reference sha, both attempts in
  one log;
- a worker killed with SIGKILL restarts the group (a fresh rendezvous) to the reference sha;
- a config typo is one `error:` line, FAILED 2:0, and never retried;
- two jobs at once on one node each meet on their own rendezvous and both finish.

AIRLOCK_SLURM=host runs the same checks against this machine's own SLURM and installed trainer
(for development; tests/slurm/cluster.sh starts one).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time

import pytest

from tests.container.conftest import ROOT

pytestmark = pytest.mark.container

STEPS = 60
SLURM_IMAGE = "airlock-slurm:test"
# a job's states on its way (a requeue passes through COMPLETING and REQUEUED to PENDING)
LIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED")
HOST_MODE = os.environ.get("AIRLOCK_SLURM") == "host"


class Cluster:
    """Shell commands on the SLURM node, and what the tests ask of it."""

    def __init__(self, run_shell, root: str, out: str) -> None:
        self._run, self.root, self.out = run_shell, root, out

    def sh(self, cmd: str, check: bool = True) -> str:
        code, output = self._run(cmd)
        assert code == 0 or not check, f"`{cmd}` exited {code}:\n{output}"
        return output

    def submit(self, run: str, *train_args: str, sbatch: str = "", nproc: int = 2) -> int:
        """sbatch from /tmp (not the project), job name = run name; -> the job id."""
        args = " ".join(shlex.quote(a) for a in ("configs/smoke.yaml", f"--train.max_steps={STEPS}",
                                                 "--checkpoint.interval=10", f"--run.out_dir={self.out}",
                                                 *train_args))
        out = self.sh(f"cd /tmp && AIRLOCK_NPROC_PER_NODE={nproc} sbatch --parsable --nodes=1 --job-name={run} "
                      f"{sbatch} {self.root}/deploy/slurm/train.sbatch {args}")
        return int(out.strip().split(";")[0])

    def job(self, job: int) -> dict:
        """The job's scontrol record. A slurmctld busy on a loaded host may answer without one
        (a timed-out RPC): asked again for up to 30 s, then the answer is the failure."""
        deadline = time.monotonic() + 30
        while True:
            text = self.sh(f"scontrol show job {job}", check=False)
            info = dict(re.findall(r"(\w+)=(\S+)", text))
            if "JobState" in info:
                return info
            assert time.monotonic() < deadline, f"`scontrol show job {job}` gave no record for 30 s:\n{text}"
            time.sleep(1)

    def wait(self, job: int, timeout: float = 400) -> dict:
        """Until the job has ended; -> its scontrol record (JobState, ExitCode ...)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job)
            if info["JobState"] not in LIVE:
                return info
            time.sleep(1)
        raise AssertionError(f"job {job} still {self.job(job)['JobState']} after {timeout} s:\n{self.log(job)}")

    def log(self, job: int) -> str:
        name = self.job(job)["JobName"]
        return self.sh(f"cat {self.root}/volumes/slurm/{name}-{job}.out", check=False)

    def rows(self, run: str) -> list[int]:
        text = self.sh(f"cat {self.out}/metrics/{run}/metrics.csv 2>/dev/null || true")
        return [int(line.split(",")[0]) for line in text.splitlines()[1:] if line.strip()]

    def latest(self, run: str) -> str:
        return self.sh(f"cat {self.out}/checkpoints/{run}/latest 2>/dev/null || true").strip()

    def sha(self, run: str) -> str:
        return re.search(r'"weights_sha256": "(\w+)"', self.sh(f"cat {self.out}/metrics/{run}/summary.json"))[1]

    def until(self, predicate, job: int, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            info = self.job(job)
            assert info["JobState"] in LIVE, f"job {job} {info['JobState']} before {what}:\n" \
                                                                 f"{self.log(job)}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{self.log(job)}"
            time.sleep(0.3)


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory):
    if HOST_MODE:
        subprocess.run([str(ROOT / "tests/slurm/cluster.sh")], check=True)
        out = tmp_path_factory.mktemp("slurm-volumes")

        def host_shell(cmd):
            p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True)
            return p.returncode, p.stdout + p.stderr

        yield Cluster(host_shell, str(ROOT), str(out))
        return
    client = request.getfixturevalue("docker_client")
    request.getfixturevalue("image")  # skips with the reason when airlock:cpu is not built
    image = _build_slurm_image(client)
    # an internal network: no route out, as --network none, but with an interface of its own;
    # SLURM resolves its node with AI_ADDRCONFIG, which finds nothing where loopback is all there is
    network = client.networks.create(f"airlock-slurm-{os.getpid()}", internal=True)
    container = client.containers.run(image, detach=True, network=network.name, hostname="node1", user="root",
                                      shm_size="1g", remove=True)
    try:
        def container_shell(cmd):
            code, output = container.exec_run(["bash", "-c", cmd], user="root")
            return code, output.decode(errors="replace")

        node = Cluster(container_shell, "/app", "/tmp/sl")
        print(node.sh("slurm-cluster"))
        yield node
    finally:
        container.kill()
        container.wait()
        network.remove()


def _build_slurm_image(client) -> str:
    """airlock:cpu + slurm-wlm and munge from Debian (the one test image built with the network)."""
    import docker

    from tests.container.conftest import IMAGE

    try:
        client.images.build(path=str(ROOT / "tests/slurm"), tag=SLURM_IMAGE, buildargs={"IMAGE": IMAGE}, rm=True)
    except docker.errors.BuildError as e:
        log = "".join(chunk.get("stream", "") + chunk.get("error", "") for chunk in e.build_log)
        if re.search(r"Temporary failure resolving|Could not resolve|Network is unreachable", log):
            pytest.skip("the SLURM test image needs Debian's packages, and deb.debian.org cannot be reached")
        raise AssertionError(f"building {SLURM_IMAGE} failed:\n{log[-3000:]}") from None
    return SLURM_IMAGE


def ended_well(info: dict, log: str) -> None:
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info['JobState']} {info['ExitCode']}\n{log}"
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def reference(cluster):
    job = cluster.submit("ref")
    info, log = cluster.wait(job), cluster.log(job)
    ended_well(info, log)
    # the job ran in the project although sbatch ran in /tmp; SLURM's own file there points to the log
    assert f"in {cluster.root}" in log, log
    assert f"logs to {cluster.root}/volumes/slurm/ref-{job}.out" in cluster.sh(f"cat /tmp/slurm-{job}.out")
    assert cluster.rows("ref") == list(range(1, STEPS + 1))
    return cluster.sha("ref")


def test_scancel_term_saves_once_completes_and_the_resubmitted_job_matches(cluster, reference):
    job = cluster.submit("stop")
    cluster.until(lambda: len(cluster.rows("stop")) >= 15, job, "15 steps")
    cluster.sh(f"scancel --signal=TERM {job}")
    info, log = cluster.wait(job), cluster.log(job)
    ended_well(info, log)
    assert log.count("stopped at step") == 1 and "second SIGTERM" not in log, log
    stopped = int(cluster.latest("stop").split("_")[1])
    assert 15 <= stopped < STEPS and cluster.rows("stop") == list(range(1, stopped + 1)), log

    again = cluster.submit("stop")
    info, log = cluster.wait(again), cluster.log(again)
    ended_well(info, log)
    assert "resumed stop from" in log, log
    assert cluster.sha("stop") == reference
    assert cluster.rows("stop") == list(range(1, STEPS + 1))  # every step once


def test_a_requeued_job_continues_to_the_same_weights_in_one_log(cluster, reference):
    job = cluster.submit("requeue")
    cluster.until(lambda: len(cluster.rows("requeue")) >= 15, job, "15 steps")
    cluster.sh(f"scontrol requeue {job}")
    cluster.until(lambda: cluster.job(job)["JobState"] == "PENDING", job, "the requeue", timeout=120)
    cluster.sh(f"scontrol update JobId={job} StartTime=now")  # SLURM holds a requeued job ~2 minutes
    info, log = cluster.wait(job), cluster.log(job)
    ended_well(info, log)
    assert "attempt 0 " in log and "attempt 1 " in log, log  # both attempts, appended to one file
    assert cluster.sha("requeue") == reference
    assert cluster.rows("requeue") == list(range(1, STEPS + 1))


def test_a_killed_worker_restarts_the_group_to_the_same_weights(cluster, reference):
    job = cluster.submit("kill")
    cluster.until(lambda: cluster.latest("kill") >= "step_000020", job, "the step-20 checkpoint")
    killed = cluster.sh("for p in $(pgrep -f -- '--run.name=kill'); do tr '\\0' '\\n' < /proc/$p/environ "
                        "| grep -qx RANK=1 && kill -9 $p && echo $p; done; true")
    assert killed.strip(), "no rank-1 worker found"
    info, log = cluster.wait(job, timeout=300), cluster.log(job)  # a restart that hung would time out here
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "was killed by SIGKILL" in log and "restart 1 of 3" in log, log
    assert cluster.sha("kill") == reference
    assert cluster.rows("kill") == list(range(1, STEPS + 1))


def test_a_config_typo_is_one_line_and_never_retried(cluster):
    job = cluster.submit("typo", "--train.max_stepz=5")
    info, log = cluster.wait(job, timeout=120), cluster.log(job)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), log
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.max_stepz" in errors[0] and "max_steps" in errors[0], log
    assert "restart" not in log and "Traceback" not in log and "ChildFailedError" not in log, log


def test_two_jobs_on_one_node_each_meet_on_their_own_rendezvous(cluster, reference):
    shared = "--oversubscribe --cpus-per-task=1"  # the script takes whole nodes unless asked to share
    jobs = [cluster.submit(name, sbatch=shared) for name in ("twin-a", "twin-b")]
    cluster.until(lambda: all(cluster.job(j)["JobState"] == "RUNNING" for j in jobs) or
                  any(cluster.job(j)["JobState"] != "PENDING" and cluster.job(j)["JobState"] != "RUNNING"
                      for j in jobs), jobs[0], "both jobs running")
    assert all(cluster.job(j)["JobState"] == "RUNNING" for j in jobs), [cluster.job(j)["JobState"] for j in jobs]
    for name, job in zip(("twin-a", "twin-b"), jobs):
        info, log = cluster.wait(job), cluster.log(job)
        ended_well(info, log)
        assert cluster.sha(name) == reference
