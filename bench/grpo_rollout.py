"""Local rollout throughput: trainer.generate.sample vs transformers' model.generate on
the same batch (64 rows x 32 new tokens, tiny GPT-2, no early stop). Run:
python bench/grpo_rollout.py"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.grpo.conftest import tiny_model  # noqa: E402
from trainer.generate import sample  # noqa: E402


def main(rows: int = 64, new: int = 32, repeats: int = 5) -> None:
    torch.set_num_threads(2)
    model = tiny_model(64, n_embd=64)
    prompt = torch.randint(1, 64, (rows, 8), generator=torch.Generator().manual_seed(0))
    ours, ref = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        sample(model, prompt.tolist(), list(range(rows)), new, pad_id=0)  # no stop ids: full length
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                       do_sample=True, top_k=0, pad_token_id=0)
        ref.append(time.perf_counter() - t)
    tokens = rows * new
    a, b = tokens / min(ours), tokens / min(ref)
    print(f"sample(): {a:,.0f} tok/s   model.generate: {b:,.0f} tok/s   ratio {a / b:.2f}x")


if __name__ == "__main__":
    main()
