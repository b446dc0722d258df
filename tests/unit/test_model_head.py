"""The padded output head (model.pad_head, which train.setup applies on CUDA): the GEMM runs on
rows padded to a multiple of 64, and nothing else may change. The padding adds only zeros, but
a reduction over the vocabulary then runs in other blocks: on an AVX2 CPU the two heads train
bit-identically, on an AVX-512/AMX one their gradients part at float32 rounding (~1e-7 of their
size; AdamW's steps carry a near-zero gradient's rounding into the weights). So
gradients and training are compared to that rounding, and checkpoints of the same weights
byte for byte; a head that kept the padded rows, untied the embedding, renamed a state-dict
key or let the padding reach the loss misses by orders of magnitude more."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from trainer import checkpoint as ckpt
from trainer import config as C
from trainer import data, lm
from trainer import model as M

VOCAB = 50257  # GPT-2's: 50257 % 64 == 17


def gpt2(vocab: int = VOCAB) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def llama(vocab: int = 1000) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                        tie_word_embeddings=False))


def batch(vocab: int, masked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (3, 16), generator=g)
    y = torch.randint(0, vocab, (3, 16), generator=g)
    if masked:
        y[:, :5] = data.IGNORE_INDEX
    return x, y


def train(model, vocab: int, steps: int = 3, masked: bool = False) -> list[float]:
    """AdamW steps on lm_loss, as train_step takes them: -> the losses."""
    optimizer = torch.optim.AdamW(M.param_groups(model, 0.1), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = lm.lm_loss(model, *batch(vocab, masked), masked=masked)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def assert_trains_alike(padded, plain, vocab: int, masked: bool = False) -> None:
    """The same gradients at the first step and the same three AdamW steps, to float32 rounding."""
    for model in (padded, plain):
        lm.lm_loss(model, *batch(vocab, masked), masked=masked).backward()
    for (name, a), (_, b) in zip(padded.named_parameters(), plain.named_parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}'s gradient: {m}")
    for model in (padded, plain):
        model.zero_grad(set_to_none=True)
    assert train(padded, vocab, masked=masked) == pytest.approx(train(plain, vocab, masked=masked), rel=1e-5)
    # AdamW moves a weight by about lr (1e-2) whatever its gradient's size, so where a gradient is
    # ~0 its rounding can move the weight by a fraction of lr; a wrong head moves them all by ~lr
    for (name, a), (_, b) in zip(padded.state_dict().items(), plain.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3, msg=lambda m: f"{name}: {m}")


def test_gpt2_head_is_padded_to_a_multiple_of_64_and_stays_tied():
    model = gpt2()
    keys = list(model.state_dict())
    assert M.pad_head(model) == 50304
    head = model.get_output_embeddings()
    assert isinstance(head, M.PaddedHead) and head.weight.shape[0] == VOCAB
    assert head.weight is model.transformer.wte.weight  # tied: one Parameter, as before
    assert list(model.state_dict()) == keys
    assert model(input_ids=batch(VOCAB)[0]).logits.shape == (3, 16, VOCAB)


@pytest.mark.parametrize("masked", [False, True])
def test_padded_head_trains_exactly_as_the_plain_one(masked):
    plain, padded = gpt2(), gpt2()
    M.pad_head(padded)
    assert_trains_alike(padded, plain, VOCAB, masked=masked)


def test_checkpoint_of_a_padded_model_is_byte_identical_and_loads_into_a_plain_one():
    plain, padded = gpt2(), gpt2()
    train(plain, VOCAB, steps=1)
    padded.load_state_dict(plain.state_dict())
    M.pad_head(padded)
    padded(input_ids=batch(VOCAB)[0])  # a forward through the padded head changes nothing saved
    opt_plain = torch.optim.AdamW(M.param_groups(plain, 0.1))
    opt_padded = torch.optim.AdamW(M.param_groups(padded, 0.1))
    args = ({ckpt.STEP: 1}, {"step": 1}, "run: {}\n")
    assert ckpt.serialize(padded, opt_padded, *args) == ckpt.serialize(plain, opt_plain, *args)
    fresh = gpt2()
    fresh.load_state_dict(padded.state_dict())
    assert M.weights_sha256(fresh) == M.weights_sha256(plain)


def test_lora_gpt2_pads_its_frozen_head_and_trains_as_before():
    cfg = C.build(overrides={"model.type": "gpt2", "data.tokenizer": "gpt2", "model.lora": True, "model.lora_r": 4,
                             "model.lora_dropout": 0.0})
    plain, padded = M.add_lora(gpt2(), cfg.model), M.add_lora(gpt2(), cfg.model)
    assert M.pad_head(padded) == 50304
    assert_trains_alike(padded, plain, VOCAB)


def test_untied_llama_head_pads_and_keeps_its_own_weight():
    plain, padded = llama(), llama()
    assert M.pad_head(padded) == 1024
    assert padded.lm_head.weight is not padded.model.embed_tokens.weight
    assert_trains_alike(padded, plain, 1000)


@pytest.mark.parametrize("vocab", [1024, 32000])
def test_a_vocabulary_already_a_multiple_of_64_is_left_alone(vocab):
    model = llama(vocab)
    head = model.lm_head
    assert M.pad_head(model) == 0 and model.lm_head is head


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_padded_head_on_a_gpu_under_bf16_autocast_matches_the_plain_head():
    """On CUDA the padded GEMM is another kernel: the logits agree to bf16 rounding, and three
    training steps end at the same losses to that rounding."""
    plain, padded = gpt2().cuda(), gpt2().cuda()
    M.pad_head(padded)
    x = batch(VOCAB)[0].cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = plain(input_ids=x).logits.float(), padded(input_ids=x).logits.float()
    assert b.shape == a.shape and (a - b).abs().max().item() < 5e-2

    def steps(model):
        optimizer = torch.optim.AdamW(M.param_groups(model, 0.1), lr=1e-2, fused=True)
        out = []
        for _ in range(3):
            x, y = (t.cuda() for t in batch(VOCAB))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = lm.lm_loss(model, x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            out.append(loss.item())
        return out

    assert steps(padded) == pytest.approx(steps(plain), abs=2e-2)
