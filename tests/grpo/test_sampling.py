"""generate.sample: a row's completion depends only on its seed and the model (not on
the batch or padding), greedy decoding equals transformers' generate, stop ids end a
row, and top_p keeps sampling inside the nucleus."""

import torch

from trainer.generate import sample
from tests.grpo.conftest import char_tokenizer, tiny_model


def test_rows_are_independent_of_batch_and_padding():
    tok = char_tokenizer()
    model = tiny_model(tok.get_vocab_size())
    prompts = [tok.encode("a*6=").ids, tok.encode("SAT n=3: (1 -2)").ids, tok.encode("b").ids]
    together = sample(model, prompts, [7, 8, 9], 12)
    alone = [sample(model, [p], [s], 12)[0] for p, s in zip(prompts, [7, 8, 9])]
    assert [s.tokens for s in together] == [s.tokens for s in alone]
    assert [s.tokens for s in sample(model, prompts, [7, 8, 10], 12)][2] != together[2].tokens


def test_greedy_matches_transformers_generate():
    model = tiny_model(30, seed=2)
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    ours = sample(model, prompts, [0, 0], 10, temperature=0)
    for p, s in zip(prompts, ours):
        ref = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
        assert s.tokens == ref[0, len(p):].tolist()
        assert s.finish_reason == "length"


def test_stop_ids_and_top_p():
    model = tiny_model(30, seed=4)
    out = sample(model, [[1, 2]] * 64, list(range(64)), 20, stop_ids=(5, 6))
    stopped = [s for s in out if s.finish_reason == "stop"]
    assert stopped and all(s.tokens[-1] in (5, 6) and not set(s.tokens[:-1]) & {5, 6} for s in stopped)
    assert all(len(s.tokens) == 20 for s in out if s.finish_reason == "length")
    # top_p tiny: only the most likely token is allowed, so it equals greedy
    greedy = sample(model, [[1, 2]], [0], 8, temperature=0)[0].tokens
    assert all(s.tokens == greedy for s in sample(model, [[1, 2]] * 8, list(range(8)), 8, top_p=1e-6))
