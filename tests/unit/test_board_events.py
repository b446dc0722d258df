"""TensorBoard event files from the metrics writer, read back by TensorBoard's own
EventAccumulator: every row's numbers under their tags; a resume purges what lay past the
resumed step, so each step appears once, even when the resume comes within the second of the
kill, and a fresh start hides an attempt that saved nothing (TensorBoard-only scalars, such as
GRPO's evaluation at iteration 0, included); a full disk under the event file is one line; an error that ends a loop is the last line
of train.log (what `trainer runs` reads), a stop is not; MFU's arithmetic."""

from __future__ import annotations

import errno
import signal

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer import metrics
from trainer.errors import UserError
from trainer.metrics import Metrics


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def rows(m: Metrics, steps, loss=lambda s: 1.0 / s) -> None:
    for s in steps:
        m.log({"step": s, "loss": loss(s), "val_loss": 0.5 if s % 5 == 0 else None, "lr": 1e-3, "note": "text"})


def test_resume_purges_past_the_resumed_step_and_each_step_appears_once(tmp_path):
    m = Metrics(tmp_path, resume_step=0)
    rows(m, range(1, 9))
    m.close()  # "killed" after step 8; the checkpoint is at step 5
    for attempt in (1, 2):  # twice in the same second: the file names still sort in order
        m = Metrics(tmp_path, resume_step=5)
        rows(m, range(6, 11), loss=lambda s: 10.0 * attempt + s)
        m.close()
    got = scalars(tmp_path)
    assert got["train/loss"] == [(s, pytest.approx(1.0 / s)) for s in range(1, 6)] + \
        [(s, 20.0 + s) for s in range(6, 11)]
    assert [s for s, _ in got["val/loss"]] == [5, 10]
    assert set(got) == {"train/loss", "val/loss", "train/lr"}  # strings ("note") and empty values are not scalars
    assert [int(r["step"]) for r in metrics.read_rows(tmp_path / "metrics.csv")] == list(range(1, 11))
    names = sorted(p.name for p in tmp_path.glob("events.out.tfevents.*"))
    stamps = [int(n.split(".")[3]) for n in names]
    assert len(names) == 3 and stamps == sorted(set(stamps)), names


def test_a_fresh_start_hides_an_earlier_attempt(tmp_path):
    m = Metrics(tmp_path, ("iteration", "loss"), resume_step=0, key="iteration")
    m.scalars(0, {"eval_reward": 0.25})  # GRPO's evaluation before its first update: no CSV row
    for i in (1, 2, 3):
        m.log({"iteration": i, "loss": 1.0})
    m.close()
    m = Metrics(tmp_path, ("iteration", "loss"), resume_step=0, key="iteration")  # the attempt before saved no checkpoint
    m.scalars(0, {"eval_reward": 0.5})
    m.log({"iteration": 1, "loss": 7.0})
    m.close()
    got = scalars(tmp_path)
    assert got["train/loss"] == [(1, 7.0)] and got["eval/reward"] == [(0, 0.5)]


def test_one_off_events_and_tags(tmp_path):
    metrics.log_events(tmp_path / "eval", 10, {"val_loss": 2.5, "perplexity": 12.2, "reward/sat": 0.5},
                       texts={"samples/eval": "def f():"})
    acc = EventAccumulator(str(tmp_path / "eval"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["reward/sat", "val/loss", "val/perplexity"]
    (text,) = acc.Tensors("samples/eval/text_summary")
    assert text.step == 10 and text.tensor_proto.string_val == [b"def f():"]
    assert metrics.tag("some_new_column") == "other/some_new_column"


def test_a_full_disk_under_the_event_file_is_one_line(tmp_path, monkeypatch):
    m = Metrics(tmp_path, resume_step=0)

    def full():
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(m.events, "flush", full)
    with pytest.raises(UserError) as e:
        m.log({"step": 1, "loss": 1.0})
    assert "No space left" in str(e.value) and "free disk space" in str(e.value) and "tfevents" in str(e.value)
    assert "\n" not in str(e.value)


def test_close_records_the_error_that_ends_a_loop_and_not_a_stop(tmp_path):
    from trainer.signals import Stopped

    log = metrics.setup_logging(tmp_path / "train.log")
    m = Metrics(tmp_path, resume_step=0)
    rows(m, range(1, 4))
    with pytest.raises(UserError):
        try:
            raise UserError("loss is nan at step 4;\nlower train.lr")
        finally:
            m.close()
    assert metrics.failure(tmp_path / "train.log") == "failed after step 3: loss is nan at step 4; lower train.lr"
    log.info("run resumed")  # a later start writes after it: no longer the run's end
    assert metrics.failure(tmp_path / "train.log") is None
    m = Metrics(tmp_path, resume_step=3)
    with pytest.raises(Stopped):
        try:
            raise Stopped(signal.SIGTERM)
        finally:
            m.close()
    assert metrics.failure(tmp_path / "train.log") is None
    assert (tmp_path / "train.log").read_text().count(" ERROR ") == 1  # the stop added none


def test_mfu_arithmetic(monkeypatch):
    import types

    import torch

    model = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 32))
    model.config = types.SimpleNamespace(n_layer=2, n_embd=32)  # as a GPT-2 config names them
    n = sum(p.numel() for p in model.parameters())
    assert metrics.flops_per_token(model, 32) == 6 * n + 12 * 2 * 32 * 32
    model[0].weight.requires_grad_(False)  # a frozen weight gets no gradient: 4 FLOPs per weight
    assert metrics.flops_per_token(model, 32) == 6 * n - 2 * 64 * 32 + 12 * 2 * 32 * 32
    assert metrics.peak_tflops("NVIDIA H100 PCIe") == 756 and metrics.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert metrics.peak_tflops("NVIDIA L40S") == 362 and metrics.peak_tflops("Some GPU") is None
    monkeypatch.setenv("AIRLOCK_PEAK_TFLOPS", "100")
    assert metrics.peak_tflops("Some GPU") == 100
    assert metrics.mfu_meter(model, torch.device("cpu"), 32) is None  # no MFU on a CPU
