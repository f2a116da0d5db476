"""Shared fixtures: tiny random models of each supported architecture, random examples."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PPTRAIN_SHARED_DATA", REPO.parent / "shared" / "data"))
TINY_ARCHS = {
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2"),
    "mistral": dict(model_type="mistral", sliding_window=None),
}


def tiny_model(arch: str = "llama", vocab: int = 97, seed: int = 0, attn: str = "sdpa", **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(TINY_ARCHS[arch])
    model_type = kwargs.pop("model_type")
    kwargs.update(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


def random_examples(n: int, k: int, vocab: int = 97, seed: int = 0, prompt=(3, 40), response=(1, 30)):
    """n TokenizedExamples with k responses of uneven lengths and all pairs (i, j), i < j."""
    from ppo_train.data.tokenize import TokenizedExample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = [rng.randrange(vocab) for _ in range(rng.randint(*prompt))]
        rs = [[rng.randrange(vocab) for _ in range(rng.randint(*response))] for _ in range(k)]
        pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
        out.append(TokenizedExample(i, p, rs, pairs))
    return out


DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env() -> dict:
    """Environment for a pptrain subprocess: without the distributed variables that an
    in-process train() left in this process (its port is taken by this process's store)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's larger public data sets (../shared/data beside the checkout, or
    PPTRAIN_SHARED_DATA): only slow tests and benchmarks use them; a clone has none."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"optional data folder {SHARED_DATA} is absent (set PPTRAIN_SHARED_DATA to use it)")
    return SHARED_DATA
