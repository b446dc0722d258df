"""The scheduler artefacts run the command the SLURM test runs: deploy/kubernetes/trainjob.yaml
(which cannot run here: no cluster, kind or k3s) starts `trainer train` with the same launcher
flags as deploy/slurm/train.sbatch, and those flags parse, through the CLI's own parser, to the
launcher options that tests/container/test_slurm.py exercises under a real SLURM."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from tests.conftest import ROOT
from trainer import cli, distributed

LAUNCH = {"--config", "--run.name", "--resume", "--nproc", "--nnodes", "--rdzv_endpoint", "--rdzv_id", "--max_restarts"}


def sbatch_command() -> list[str]:
    """The srun line of the SLURM script, continuation lines joined, from `python` on."""
    text = (ROOT / "deploy/slurm/train.sbatch").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.strip().startswith("srun "))
    words = shlex.split(line)
    return words[words.index("python"):]


def k8s_command() -> list[str]:
    doc = yaml.safe_load((ROOT / "deploy/kubernetes/trainjob.yaml").read_text())
    pod = doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    return [*container["command"], *container["args"]]


def flags(words: list[str]) -> set[str]:
    return {w.split("=", 1)[0] for w in words if w.startswith("--")}


def test_slurm_and_kubernetes_start_the_same_launcher():
    slurm, k8s = sbatch_command(), k8s_command()
    assert slurm[:4] == ["python", "-m", "trainer", "train"], slurm
    assert k8s[:2] == ["trainer", "train"], k8s
    assert LAUNCH <= flags(slurm) and LAUNCH <= flags(k8s), (flags(slurm), flags(k8s))
    assert "--resume=auto" in slurm and "--resume=auto" in k8s


def test_the_kubernetes_flags_parse_to_launcher_options():
    fn = cli._load("train")
    args = k8s_command()[2:]
    kwargs = cli._parse(fn, args, "trainer train")
    launch = distributed.Launch(kwargs["nproc"], kwargs["nnodes"], kwargs["rdzv_endpoint"], kwargs["rdzv_id"],
                                kwargs["max_restarts"])
    assert (launch.nnodes, launch.nproc, launch.max_restarts) == (2, 1, 3)
    # every attempt meets on its own port, which the pod must expose
    doc = (ROOT / "deploy/kubernetes/trainjob.yaml").read_text()
    ports = {int(p) for p in re.findall(r"containerPort: (\d+)", doc)}
    assert {int(launch.rendezvous(k, "r")[0].rsplit(":", 1)[1]) for k in range(launch.max_restarts + 1)} <= ports
    job = yaml.safe_load(doc)["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["parallelism"] == launch.nnodes  # one pod per node


@pytest.mark.parametrize("flags_, message", [
    (["--nnodes=2"], "needs --rdzv_endpoint"),
    (["--rdzv_endpoint=node1"], "HOST:PORT"),
    (["--rdzv_endpoint=node1:65535"], "port below"),
    (["--nproc=0"], "--nproc=0 must be at least 1"),
    (["--max_restarts=-1"], "--max_restarts=-1"),
])
def test_bad_launcher_options_are_one_line(flags_, message, tmp_path):
    from tests.conftest import run_cli

    result = run_cli(["train", "--config", str(ROOT / "configs/smoke.yaml"), f"--run.out_dir={tmp_path}", *flags_],
                     cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not any(tmp_path.iterdir())  # nothing started, nothing written
