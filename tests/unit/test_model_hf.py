"""The parts of model.type=hf / data.tokenizer=model that need no training run: the end-of-text
token found by name (not assumed to be <|endoftext|>), a model folder without tokenizer.json
read through AutoTokenizer, the prepared data's settings naming the tokenizer by its sha256 (a
replaced tokenizer is not the same data), each architecture's own dropout keys, LoRA's default
targets and fan_in_fan_out, and the config rules (tokenizer_path follows model.path)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models

from tests.conftest import ROOT
from trainer import config as C
from trainer import data
from trainer import model as M
from trainer import tokenizer as tk
from trainer.errors import UserError

GPT2_TOKENIZER = ROOT / "vendor" / "tokenizers" / "gpt2"


def word_level(tokens: list[str], special: list[str]) -> Tokenizer:
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    tok.add_special_tokens(special)
    return tok


@pytest.mark.parametrize("vocab, special, eos", [
    (["<unk>", "<s>", "</s>", "a"], ["<unk>", "<s>", "</s>"], "</s>"),  # Llama 2, Mistral
    (["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "a"], ["<|begin_of_text|>", "<|end_of_text|>",
                                                                    "<|eot_id|>"], "<|end_of_text|>"),  # Llama 3
    (["a", "<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
     "<|endoftext|>"),  # Qwen2: documents end with <|endoftext|>
    (["<pad>", "<eos>", "<bos>", "a"], ["<pad>", "<eos>", "<bos>"], "<eos>"),  # Gemma
    (["a", "<|my_stop_end|>"], ["<|my_stop_end|>"], "<|my_stop_end|>"),  # one special token named like an end
])
def test_eot_id_finds_the_models_own_end_of_text(vocab, special, eos):
    tok = word_level(vocab, special)
    assert tk.eot_id(tok) == vocab.index(eos)
    hf = tk.to_hf(tok)
    assert hf.eos_token == eos and hf.pad_token is not None


def test_a_tokenizer_without_an_end_of_text_token_is_refused():
    with pytest.raises(UserError, match="no end-of-text token"):
        tk.eot_id(word_level(["a", "b"], []))


def test_gpt2_tokenizer_keeps_endoftext_everywhere():
    hf = tk.to_hf(tk.load_gpt2(GPT2_TOKENIZER))
    assert (hf.eos_token, hf.bos_token, hf.unk_token, hf.pad_token) == (tk.EOT,) * 4


def test_a_folder_without_tokenizer_json_goes_through_autotokenizer(tmp_path):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((GPT2_TOKENIZER / name).read_bytes())
    tok = tk.load_model_tokenizer(tmp_path)
    assert tok.encode("def f(x):").ids == tk.load_gpt2(GPT2_TOKENIZER).encode("def f(x):").ids
    assert tk.eot_id(tok) == 50256


def test_a_folder_without_any_tokenizer_is_one_line(tmp_path):
    with pytest.raises(UserError, match="holds no tokenizer files"):
        tk.load_model_tokenizer(tmp_path)
    with pytest.raises(UserError, match="is not a folder"):
        tk.load_model_tokenizer(tmp_path / "missing")


def test_prepared_settings_name_the_tokenizer_by_its_sha256(tmp_path):
    folder = tmp_path / "tiny-model"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((GPT2_TOKENIZER / "tokenizer.json").read_bytes())
    cfg = C.build(environ={}, overrides={"model.type": "hf", "model.path": str(folder), "data.tokenizer": "model",
                                         "data.source": "corpus"})
    assert cfg.data.tokenizer_path == str(folder)  # the model's own folder
    before = data.settings(cfg.data)
    assert before["tokenizer_sha256"] == tk.model_tokenizer_sha256(folder)
    assert data._names(cfg.data, before)[0] == "corpus-model-tiny-model"
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|changed|>"
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    assert data.settings(cfg.data)["tokenizer_sha256"] != before["tokenizer_sha256"]


def test_config_rules_for_hf():
    cfg = C.build(environ={}, overrides={"model.type": "hf", "model.path": "m", "data.tokenizer": "model",
                                         "data.tokenizer_path": "other", "model.lora": True})
    assert cfg.data.tokenizer_path == "other"  # set on purpose: kept
    with pytest.raises(UserError, match="model.type=hf needs data.tokenizer=model"):
        C.build(environ={}, overrides={"model.type": "hf", "data.tokenizer": "bpe"})
    with pytest.raises(UserError, match="model.lora=true needs model.type=gpt2 or hf"):
        C.build(environ={}, overrides={"model.lora": True})


@pytest.mark.parametrize("kind, keys", [
    ("gpt2", ["attn_pdrop", "embd_pdrop", "resid_pdrop"]),
    ("llama", ["attention_dropout"]),
    ("qwen2", ["attention_dropout"]),
    ("gpt_neox", ["attention_dropout", "hidden_dropout"]),
    ("gpt_neo", ["attention_dropout", "embed_dropout", "resid_dropout"]),
    ("mamba", []),
])
def test_dropout_goes_to_the_architectures_own_keys(kind, keys, tmp_path):
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING[kind]()
    assert M.dropout_keys(config) == keys
    if keys:
        assert M.set_dropout(config, 0.25, tmp_path) == keys
        assert all(getattr(config, k) == 0.25 for k in keys)
    else:
        assert M.set_dropout(config, 0.0, tmp_path) == []
        with pytest.raises(UserError, match=r"model.dropout=0.25 but the mamba model .* has no dropout setting"):
            M.set_dropout(config, 0.25, tmp_path)


def test_lora_targets_default_to_the_linear_layers_and_fan_in_fan_out_to_conv1d():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    hf = C.ModelConfig(type="hf", lora=True, lora_r=2)
    assert M.lora_targets(llama, hf) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    peft_llama = M.add_lora(llama, hf)
    assert peft_llama.peft_config["default"].fan_in_fan_out is False
    with pytest.raises(UserError, match="model.lora_targets names nope"):
        M.lora_targets(llama, C.ModelConfig(type="hf", lora_targets=["nope"]))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=32))
    for kind in ("gpt2", "hf"):  # a GPT-2 folder loaded either way keeps its Conv1D targets
        assert M.lora_targets(gpt2, C.ModelConfig(type=kind)) == M.GPT2_TARGETS
    assert M.add_lora(gpt2, C.ModelConfig(type="gpt2", lora=True)).peft_config["default"].fan_in_fan_out is True


def test_a_gpt2_type_refuses_another_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="holds a 'llama' model, not GPT-2; load it with model.type=hf"):
        M.load_pretrained(tmp_path)


def test_a_folder_needing_custom_code_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "my_arch",
                                                      "auto_map": {"AutoConfig": "configuration_my.MyConfig"}}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="needs its own Python code"):
        M.load_pretrained(tmp_path, kind="hf")
