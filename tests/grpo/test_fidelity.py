"""Token fidelity: what GRPO trains on is exactly what the sampler drew.

For GPT-2's byte-level BPE, decoding sampled ids and encoding the text again is not the
identity, so a trainer that re-encodes trains on tokens nobody sampled. A tiny GPT-2 with
the real 50,257-token vocabulary is fitted (a bigram table, about 3 s) to answer three
prompts with fixed ids, and both backends (the policy in this process, and `trainer
serve` over HTTP) sample it greedily:

- "a", "b", "\\n" (stop "\\n"): re-encoded, "ab\\n" is [397, 198]; trained: [64, 65, 198];
- "x", "\\n\\n" (stop "\\n"): the stop string ends inside the second token; trained: both,
  the completing token whole; the reward sees "x";
- " October", "eto" with max_tokens 2 after a prompt that fills the model's other 10
  positions: re-encoded, " Octobereto" is 4 tokens, 2 more than the model has positions
  for (issue 8's IndexError in training); trained: the 2 sampled ids, and training runs.

The batch the loop builds (rollout_batch) holds each prompt's ids followed by exactly
these ids, and a training step on it runs. And at temperature 1 on a random GPT-2, 64
completions, many of which re-encode to other ids, are kept id for id by both backends.
"""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from trainer import config as configs
from trainer.generate import sample
from trainer.grpo.envs import Problem
from trainer.grpo.loop import rollout_batch, train_epoch
from trainer.grpo.rewards import Scorer
from trainer.grpo.rollout import LocalBackend, OpenAIBackend, SamplingParams
from tests.grpo.conftest import RunningServer, save_hf_folder

EOT = 50256
A, X, OCT = [64, 65, 198], [87, 628], [3267, 27206]  # "a" "b" "\n" / "x" "\n\n" / " October" "eto"
ANSWERS = {"A": A + [EOT], "B": X + [EOT], "C 1 2 3 4 5 6 7 8 9": OCT}
POSITIONS = 12  # the C prompt is 10 tokens: 10 + max_tokens 2 fills them


def fitted(tok) -> GPT2LMHeadModel:
    """A 1-layer GPT-2 that continues each prompt of ANSWERS with its ids (greedy, p > 0.99)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=POSITIONS, n_embd=64, n_layer=1, n_head=1,
                                       bos_token_id=EOT, eos_token_id=EOT, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0, tie_word_embeddings=False))
    rows = [(tok.encode(p).ids, c) for p, c in ANSWERS.items()]
    ids = torch.full((len(rows), POSITIONS), EOT)
    labels, attn = torch.full_like(ids, -100), torch.zeros_like(ids)
    for i, (p, c) in enumerate(rows):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
        attn[i, :len(p) + len(c)] = 1
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory, gpt2_tok):
    """(policy, HF folder) of the fitted model; the folder carries GPT-2's tokenizer.json."""
    path = tmp_path_factory.mktemp("fidelity")
    model = fitted(gpt2_tok)
    save_hf_folder(path, model, gpt2_tok)
    return model, path


def backends(model, path, tok, rows: int, per_request: int):
    """Both backends over the same weights, with the same rows per forward batch (one request
    of `per_request` prompts at a time, `rows` = its completions), so that float rounding
    cannot make them differ."""
    from trainer.serve import create_app

    server = RunningServer(create_app(str(path), name="fid"))
    return server, {"local": LocalBackend(model, tok, EOT, batch_size=rows, request_prompts=per_request),
                    "openai": OpenAIBackend(server.url, "fid", tok, EOT, request_prompts=per_request, concurrency=1)}


def scorer(score) -> Scorer:
    """A reward of one completion's text, with the batch signature the loop calls."""
    return Scorer(("score",), (lambda prompts, completions, **columns: [score(t) for t in completions],), (1.0,))


def cfg(**extra):
    return configs.load(None, **{"grpo.group_size": 2, "grpo.temperature": 0.0, "grpo.minibatch_size": 8,
                                 "run.device": "cpu", **extra})


def test_trained_ids_are_the_sampled_ids(served, gpt2_tok):
    model, path = served
    tok = gpt2_tok
    assert tok.encode(tok.decode(A)).ids != A and len(tok.encode(tok.decode(OCT)).ids) == 4  # the traps are real
    problems = [Problem("repeat", "train", i, p) for i, p in enumerate(["A", "B"])]
    long = [Problem("repeat", "train", 2, "C 1 2 3 4 5 6 7 8 9")]
    assert len(tok.encode(long[0].prompt).ids) + 2 == POSITIONS
    server, both = backends(model, path, tok, rows=4, per_request=2)
    try:
        for name, backend in both.items():
            c = cfg()
            params = SamplingParams(max_tokens=4, temperature=0.0, stop=("\n",))
            groups = backend.generate([tok.encode(p.prompt).ids for p in problems], 2, 0, params)
            a, x = groups[0][0], groups[1][0]
            assert (a.token_ids, a.text, a.finish_reason) == (A, "ab", "stop"), name
            assert (x.token_ids, x.text, x.finish_reason) == (X, "x", "stop"), name  # "\n\n" kept whole
            assert len(a.logprobs) == 3 and all(lp > -0.1 for lp in a.logprobs + x.logprobs), name

            batch, stats, _ = rollout_batch(backend, c, problems, params, scorer(lambda t: float(len(t))), EOT, tok, 1)
            assert batch["ids"][0, :4].tolist() == tok.encode("A").ids + A, name
            assert batch["ids"][2, :3].tolist() == tok.encode("B").ids + X, name
            assert stats["tokens"] == 2 * (3 + 2)
            policy = copy.deepcopy(model)  # the step must not change the served weights
            train_epoch(policy, None, torch.optim.SGD(policy.parameters(), lr=0.0), batch, c, 1)

            params = SamplingParams(max_tokens=2, temperature=0.0, stop=("\n",))
            batch, stats, _ = rollout_batch(backend, c, long, params, scorer(lambda t: 0.0), EOT, tok, 1)
            assert batch["ids"].shape[1] == POSITIONS and batch["ids"][0, -2:].tolist() == OCT, name
            assert stats["truncated_ratio"] == 1.0
            out = train_epoch(policy, None, torch.optim.SGD(policy.parameters(), lr=0.0), batch, c, 1)
            assert out["logprob_mismatch"] < 1e-4, (name, out)
    finally:
        server.stop()


def test_random_completions_keep_their_ids(gpt2_dir, gpt2_tok, tmp_path):
    """Temperature 1 on a random GPT-2: the ids of 64 completions are the sampler's, though
    decoding and re-encoding changes many of them."""
    from transformers import AutoModelForCausalLM

    tok = gpt2_tok
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir, local_files_only=True).eval()
    save_hf_folder(tmp_path, model, tok)
    prompts = [tok.encode(t).ids for t in ("Once upon", "def f(x):", "1 + 1 =", "The")]
    params = SamplingParams(max_tokens=8, temperature=1.0)
    server, both = backends(model, tmp_path, tok, rows=16, per_request=1)
    try:
        got = {name: backend.generate(prompts, 16, 5, params) for name, backend in both.items()}
    finally:
        server.stop()
    rows = [p for p in prompts for _ in range(16)]
    # 16 rows per request and per local batch: one prompt each, sampled with seed + j*16 + i
    drawn = [s.tokens for j in range(4)
             for s in sample(model, rows[16 * j:16 * (j + 1)], [5 + j * 16 + i for i in range(16)], 8, 1.0, 1.0,
                             (EOT,), EOT)]
    for name, groups in got.items():
        assert [c.token_ids for g in groups for c in g] == drawn, name
    changed = sum(tok.encode(tok.decode(ids)).ids != ids for ids in drawn)
    assert changed >= 8, changed  # measured: 18 of 64 in issue 8's fixture run
