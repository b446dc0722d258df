"""Metric files: every step once after a resume, even when a crash or a full disk cut the
last JSONL line short; the loss plot is drawn from what is readable."""

from __future__ import annotations

import json

from trainer.metrics import Metrics, plot_loss, read_jsonl, read_rows


def test_resume_truncates_past_the_checkpoint_and_skips_a_torn_line(tmp_path):
    m = Metrics(tmp_path)
    for step in range(1, 8):
        m.log({"step": step, "loss": 1.0 / step, "val_loss": 0.5 if step == 5 else None})
    m.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "loss": 0.1')  # killed mid-write
    (tmp_path / "eval.jsonl").write_text('{"step": 5, "val_loss": 0.6}\n{"step": 7, "val_')
    m = Metrics(tmp_path, resume_step=5)
    m.log({"step": 6, "loss": 0.2})
    m.close()
    assert [int(r["step"]) for r in read_rows(tmp_path / "metrics.csv")] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 6
    assert plot_loss(tmp_path).read_bytes()[:4] == b"\x89PNG"


def test_the_plot_skips_damaged_rows_and_an_unwritable_plot_is_only_a_warning(tmp_path, caplog):
    m = Metrics(tmp_path)
    for step in range(1, 5):
        m.log({"step": step, "loss": 1.0 / step})
    m.close()
    (tmp_path / "eval.jsonl").write_text('{"step": "x", "val_loss": 0.6}\n{"step": 2, "val_loss": "nan"}\n'
                                         '{"step": 3, "val_loss": 0.4}\n' + "[" * 100_000 + "\n")
    assert plot_loss(tmp_path).read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "loss.png").unlink()
    (tmp_path / "loss.png").mkdir()  # in the way: os.replace cannot put the plot there
    assert plot_loss(tmp_path) is None
    assert "could not write" in caplog.text and "metrics.csv" in caplog.text
    assert not (tmp_path / "loss.tmp.png").exists()
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # the evaluator draws one per checkpoint: none may stay open
    assert [int(r["step"]) for r in read_rows(tmp_path / "metrics.csv")] == [1, 2, 3, 4]


def test_resume_leaves_out_rows_with_no_step_number_and_says_how_many(tmp_path, caplog):
    """A power cut can leave NUL bytes or a torn line; a hand edit a step that is not a number.
    Such rows are dropped when a resume rewrites the files, with a warning, never a traceback."""
    m = Metrics(tmp_path)
    for step in range(1, 5):
        m.log({"step": step, "loss": 1.0})
    m.close()
    with open(tmp_path / "metrics.csv", "ab") as f:
        f.write(b"\x00\x00\x00\nabc,1,,,,,,,\n\xff\xfe,2\n")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": "abc", "loss": 1}\n{"step": [1]}\n{"step": true}\n{"loss": 2}\n')
    m = Metrics(tmp_path, resume_step=3)
    m.log({"step": 4, "loss": 0.5})
    m.close()
    assert [r["step"] for r in read_rows(tmp_path / "metrics.csv")] == ["1", "2", "3", "4"]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    warned = [r.getMessage() for r in caplog.records if "damaged row" in r.getMessage()]
    assert len(warned) == 2 and "left out 3 damaged rows" in warned[0] and "left out 4" in warned[1], warned
