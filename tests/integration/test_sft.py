"""SFT (issue 17, item 3): data.format=sft, the loss on completion tokens only.

- The loss mask: `trainer prepare` stores train_mask.bin / val_mask.bin beside the tokens;
  the sampler's targets are IGNORE_INDEX where the mask is 0; prompt targets contribute
  nothing (changing the token of a prompt-only target leaves the loss and every gradient
  bit-identical, while changing a completion target does not), and a window of prompt only
  gives loss 0 with zero gradients, not NaN.
- Plain template (no chat template): prompt/completion and chat rows laid out as data.py's
  docstring says, the mask on the completion, the assistant content and its end-of-text token.
- Chat template: a tiny tokenizer folder whose tokenizer_config.json has a ChatML
  chat_template; every example's tokens are exactly transformers' apply_chat_template text
  followed by the end-of-text token, the trained tokens exactly the assistant turns.
- An SFT folder is never reused for text (nor the other way round): the settings differ.
- A tiny from-scratch model learns a prompt -> completion mapping through the real CLI: the
  completion loss falls far below its start, and the greedy end-of-run sample, from a prompt
  of the held-out split, is that prompt's completion.
- An SFT run interrupted by SIGTERM and resumed ends bit-exact (weights sha256, losses).
- Bad SFT input is one line naming the row, file or key (exit 2 through the CLI).
"""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch

from tests.conftest import run_cli, start_cli, tiny_args, wait_for
from tests.integration.test_resume_exact import losses, summary
from trainer import checkpoint as ckpt
from trainer import config as C
from trainer import data as D
from trainer import lm
from trainer import model as models
from trainer import tokenizer as tk
from trainer.errors import UserError
from trainer.metrics import read_rows

QUIET = {"log": lambda *_: None}
NAMES = ["anna", "boris", "carla", "dmitri", "elena", "felix", "greta", "hugo", "irene", "jonas", "karin", "lucas",
         "marta", "nils", "olga", "pavel", "quinn", "rosa", "sven", "tanja"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def pairs_file(path, repeats=15):
    """The 20 name -> reversed name pairs, each `repeats` times in a seeded order."""
    rows = [{"prompt": f"name: {n}\n", "completion": n[::-1]} for n in NAMES] * repeats
    order = np.random.default_rng(0).permutation(len(rows))
    path.write_text("".join(json.dumps(rows[i]) + "\n" for i in order))
    return path


def data_cfg(tmp_path, source, **kw):
    return C.build(environ={}, overrides={"data.prepared_dir": str(tmp_path / "prepared"), "data.source": str(source),
                                          "data.tokenizer": "char", "data.format": "sft", **kw}).data


def read(folder, split="train"):
    meta = D.read_meta(folder)
    return (np.fromfile(folder / f"{split}.bin", np.dtype(meta["dtype"])),
            np.fromfile(folder / f"{split}_mask.bin", np.uint8))


# ---------------------------------------------------------------------------- the loss mask

def test_prompt_targets_contribute_nothing(tmp_path):
    folder = D.prepare(data_cfg(tmp_path, pairs_file(tmp_path / "pairs.jsonl")), **QUIET)
    meta = D.read_meta(folder)
    assert meta["format"] == "sft" and meta["train_targets"] < meta["train_tokens"]
    tokens, mask = read(folder)
    assert len(mask) == len(tokens) == meta["train_tokens"] and set(np.unique(mask)) == {0, 1}

    batches = D.Batches.open(folder, block_size=32, batch_size=4, seed=3)
    assert batches.masked
    x, y = batches.get_batch("train", 1)
    raw = D.Batches(batches.train, batches.val, 32, 4, 3).get_batch("train", 1)[1]  # the same windows, unmasked
    counted = y != D.IGNORE_INDEX
    assert torch.equal(y[counted], raw[counted]) and 0 < counted.sum() < counted.numel()

    torch.manual_seed(0)
    cfg = C.build(environ={}, overrides={"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32,
                                         "model.block_size": 32})
    model, _ = models.build_model(cfg.model, meta["vocab_size"], meta["eot_id"], seed=0)

    def loss_and_grads(labels):
        model.zero_grad(set_to_none=True)
        loss = lm.lm_loss(model, x, labels, masked=True)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    def masked(targets):
        return targets.masked_fill(~counted, D.IGNORE_INDEX)

    loss, grads = loss_and_grads(masked(raw))
    prompt = (~counted).nonzero()[0]  # a prompt-only target: its token changed, nothing else
    other = raw.clone()
    other[tuple(prompt)] = (raw[tuple(prompt)] + 1) % meta["vocab_size"]
    loss2, grads2 = loss_and_grads(masked(other))
    assert torch.equal(loss, loss2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    completion = counted.nonzero()[0]  # a completion target changed: the loss does change
    other = raw.clone()
    other[tuple(completion)] = (raw[tuple(completion)] + 1) % meta["vocab_size"]
    assert not torch.equal(loss, loss_and_grads(masked(other))[0])
    # the mean is over counted targets only: the per-target cross-entropy averaged by hand
    with torch.no_grad():
        logits = model(input_ids=x).logits.float()
        each = torch.nn.functional.cross_entropy(logits[counted], raw[counted], reduction="none")
    assert torch.allclose(loss, each.mean(), rtol=1e-5)
    # a window with no counted target: 0 and zero gradients, not NaN
    none, zero = loss_and_grads(torch.full_like(raw, D.IGNORE_INDEX))
    assert none.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in zero)


# ---------------------------------------------------------------------------- templates

def test_plain_template_layout_and_mask(tmp_path):
    src = tmp_path / "mixed.jsonl"
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ciao"}]
    src.write_text(json.dumps({"prompt": "2+2=", "completion": "4"}) + "\n" + json.dumps({"messages": chat}) + "\n")
    folder = D.prepare(data_cfg(tmp_path, src, **{"data.val_fraction": 0.5}), **QUIET)
    tok = tk.load(folder)
    tokens, mask = (np.concatenate(pair) for pair in zip(read(folder), read(folder, "val")))
    eot = "<|endoftext|>"

    def text(ids):
        return tok.decode([int(i) for i in ids], skip_special_tokens=False)

    assert text(tokens) == (f"2+2=4{eot}<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\nhello{eot}"
                            f"<|user|>\nbye\n<|assistant|>\nciao{eot}")
    assert text(tokens[mask == 1]) == f"4{eot}hello{eot}ciao{eot}"
    assert D.read_meta(folder)["chat_template"] == D.PLAIN_TEMPLATE
    # data.max_bytes: rows while their text fits, none cut (the chat's 50 bytes would pass 20)
    cut = D.prepare(data_cfg(tmp_path, src, **{"data.max_bytes": 20}), **QUIET)
    assert D.read_meta(cut)["source"] == "mixed.jsonl: 1 examples, 5 bytes"


def chatml_folder(tmp_path):
    """A tiny tokenizer folder as a chat model has one: tokenizer.json with ChatML's special
    tokens, tokenizer_config.json with its chat_template."""
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers, trainers

    tok = Tokenizer(tmodels.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the user asks and the assistant answers: " + " ".join(NAMES)], trainer=trainer)
    folder = tmp_path / "chat-tokenizer"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "chat_template": CHATML}))
    return folder


def test_chat_template_rows(tmp_path):
    from transformers import AutoTokenizer

    folder = chatml_folder(tmp_path)
    chats = [[{"role": "system", "content": "answer with the name reversed"},
              {"role": "user", "content": f"name: {n}"}, {"role": "assistant", "content": n[::-1]},
              {"role": "user", "content": "and again"}, {"role": "assistant", "content": n[::-1].upper()}]
             for n in NAMES] * 3
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    prepared = D.prepare(data_cfg(tmp_path, src, **{"data.tokenizer": "model", "data.tokenizer_path": str(folder)}),
                         **QUIET)
    meta = D.read_meta(prepared)
    assert meta["chat_template"] == "tokenizer" and "60 chats, its chat template" in meta["source"]
    tokens, mask = read(prepared)
    tok = tk.load(prepared)
    eot = tk.eot_id(tok)
    hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ends = np.flatnonzero(tokens == eot)
    for i, (start, end) in enumerate(zip([-1, *ends[:-1]], ends[:5])):  # the first examples of train.bin
        ids, kept = tokens[start + 1:end + 1], mask[start + 1:end + 1]
        rendered = hf.apply_chat_template(chats[i], tokenize=False)
        assert tok.decode(ids.tolist(), skip_special_tokens=False) == rendered + "<|endoftext|>"
        n = NAMES[i % len(NAMES)]
        assert tok.decode(ids[kept == 1].tolist(), skip_special_tokens=False) == \
            f"{n[::-1]}<|im_end|>\n{n[::-1].upper()}<|im_end|>\n<|endoftext|>"
    prompt = tok.decode(D.heldout_prompt(prepared), skip_special_tokens=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    # the template is part of the settings: another template, another folder
    config = json.loads((folder / "tokenizer_config.json").read_text())
    before = D.settings(data_cfg(tmp_path, src, **{"data.tokenizer": "model", "data.tokenizer_path": str(folder)}))
    (folder / "chat_template.jinja").write_text(CHATML.replace("\n{{ m['content'] }}", ": {{ m['content'] }}"))
    after = D.settings(data_cfg(tmp_path, src, **{"data.tokenizer": "model", "data.tokenizer_path": str(folder)}))
    assert before["chat_template"] != after["chat_template"] and config["chat_template"] == CHATML


def test_an_export_carries_the_chat_template_it_was_trained_with(tmp_path):
    """`trainer export` of a run on a chat model's tokenizer: AutoTokenizer on the export renders
    chats as the model folder does (what vLLM's and `trainer serve`'s chat endpoints use)."""
    from transformers import AutoTokenizer

    folder = chatml_folder(tmp_path)
    chat = [{"role": "user", "content": "name: anna"}, {"role": "assistant", "content": "anna"[::-1]}]
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps({"messages": chat}) + "\n" for _ in range(40)))
    run_cli(["train", *sft_args(src, tmp_path, "chat", **{"data.tokenizer": "model", "data.tokenizer_path": folder,
                                                           "train.max_steps": 2, "sample.max_new_tokens": 2})],
            cwd=tmp_path)
    run_cli(["export", "--run", "chat", "--out", str(tmp_path / "export"), "--out_dir", str(tmp_path / "volumes")],
            cwd=tmp_path)
    exported = AutoTokenizer.from_pretrained(tmp_path / "export", local_files_only=True)
    source = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert exported.apply_chat_template(chat, tokenize=False) == source.apply_chat_template(chat, tokenize=False)
    assert "<|im_start|>user" in exported.apply_chat_template(chat, tokenize=False)


def test_sft_folder_is_never_reused_for_text(tmp_path):
    src = pairs_file(tmp_path / "pairs.jsonl", repeats=2)
    sft = D.prepare(data_cfg(tmp_path, src), **QUIET)
    text_cfg = data_cfg(tmp_path, src, **{"data.format": "text", "data.text_field": "prompt"})
    assert sft.name == "pairs-char-sft" and D.find_prepared(text_cfg) != sft
    text = D.prepare(text_cfg, **QUIET)
    assert text != sft and "format" not in D.read_meta(text) and not (text / "train_mask.bin").exists()
    assert D.find_prepared(data_cfg(tmp_path, src)) == sft
    for kw, differs in (({"data.format": "text"}, "(data.format='sft' there but 'text' in the config)"),
                        ({"data.completion_field": "answer"},
                         "(data.completion_field='completion' there but 'answer' in the config)")):
        with pytest.raises(UserError) as err:
            D.find_prepared(data_cfg(tmp_path, src, **{"data.name": sft.name, **kw}))
        assert f"other settings {differs};" in str(err.value), str(err.value)


# ---------------------------------------------------------------------------- bad input

def test_bad_sft_input_is_one_line(tmp_path, corpus_dir):
    cases = [
        ('{"question": "x", "answer": "y"}',
         "rows.jsonl:1: no 'messages' list of messages and no 'prompt'/'completion' pair (has: question, answer)"),
        ('{"prompt": "x", "completion": 3}', "rows.jsonl:1: 'prompt' and 'completion' must both be strings"),
        ('{"messages": [{"role": "user"}]}', "rows.jsonl:1: data.messages_field 'messages'[0] is not a"),
        ('{"messages": "hi"}', "must be a non-empty list"),
    ]
    for row, says in cases:
        (tmp_path / "rows.jsonl").write_text(row + "\n")
        with pytest.raises(UserError) as err:
            D.prepare(data_cfg(tmp_path, tmp_path / "rows.jsonl"), **QUIET)
        assert "\n" not in str(err.value) and says in str(err.value), str(err.value)
    with pytest.raises(UserError, match="data.format=sft reads rows .* is a .py file"):
        D.prepare(data_cfg(tmp_path, corpus_dir / "mod_00.py"), **QUIET)
    with pytest.raises(UserError, match="data.completion_field is empty"):
        data_cfg(tmp_path, corpus_dir, **{"data.completion_field": ""})
    proc = run_cli(["prepare", f"--data.source={corpus_dir}", "--data.format=sft", "--data.tokenizer=char",
                    f"--data.prepared_dir={tmp_path / 'p'}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "holds no .jsonl or .parquet files for data.format=sft" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---------------------------------------------------------------------------- through the CLI

def sft_args(src, out, name, **extra):
    return tiny_args(src, out, name, **{"data.format": "sft", "model.block_size": 32, "model.n_embd": 64,
                                        "train.batch_size": 16, "train.lr": 1e-2, "train.warmup_steps": 10,
                                        "train.max_steps": 300, "train.eval_interval": 100, "train.log_interval": 50,
                                        "checkpoint.interval": 0, "sample.temperature": 0,
                                        "sample.max_new_tokens": 8, **extra})


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return pairs_file(tmp_path_factory.mktemp("sft-data") / "pairs.jsonl")


def test_tiny_model_learns_prompt_to_completion(tmp_path, pairs):
    proc = run_cli(["train", *sft_args(pairs, tmp_path, "learn")], cwd=tmp_path)
    metrics = tmp_path / "volumes" / "metrics" / "learn"
    rows = read_rows(metrics / "metrics.csv")
    first = float(rows[0]["loss"])
    last = sum(float(r["loss"]) for r in rows[-20:]) / 20
    assert first > 2.0 and last < 0.15 * first, (first, last)  # the completion loss: ln(27) at the start
    assert float(rows[-1]["val_loss"]) < 0.5
    prepared = next((tmp_path / "prepared").iterdir())
    tok = tk.load(prepared)
    prompt = tok.decode(D.heldout_prompt(prepared))
    assert prompt.startswith("name: ") and prompt.endswith("\n")
    name = prompt[len("name: "):-1]
    assert name in NAMES and f"after the held-out prompt {prompt!r}" in proc.stdout
    sample = (metrics / "samples.txt").read_text()
    assert sample.startswith(name[::-1] + "<|endoftext|>"), (name, sample)  # greedy: the reversed name, then stop


def test_sft_resume_after_sigterm_is_bit_exact(tmp_path, pairs):
    extra = {"train.max_steps": 40, "train.batch_size": 4, "model.dropout": 0.1, "checkpoint.interval": 10,
             "train.eval_interval": 20, "train.eval_iters": 2}
    run_cli(["train", *sft_args(pairs, tmp_path / "ref", "ref", **extra)], cwd=tmp_path)
    name = "stopped"
    metrics_csv = tmp_path / "volumes" / "metrics" / name / "metrics.csv"
    run_dir = tmp_path / "volumes" / "checkpoints" / name
    proc = start_cli(["train", *sft_args(pairs, tmp_path, name, **extra)], cwd=tmp_path)
    try:
        wait_for(lambda: len(read_rows(metrics_csv)) >= 13, proc=proc)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped_at = int(ckpt.latest_name(run_dir).split("_")[1])
    assert 13 <= stopped_at < 40
    resumed = run_cli(["resume", "--run", name, "--run.out_dir", str(tmp_path / "volumes")], cwd=tmp_path)
    assert f"resumed {name}" in resumed.stdout
    assert summary(tmp_path, name)["weights_sha256"] == summary(tmp_path / "ref", "ref")["weights_sha256"]
    got = losses(tmp_path, name)
    assert [s for s, _ in got] == list(range(1, 41)) and got == losses(tmp_path / "ref", "ref")
