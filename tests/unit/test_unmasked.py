"""layout=unmasked (packing without a mask, LoRA): the mask matters before training, the
config refuses exact-math losses, adapters are saved, the merged export loads and matches."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ppo_train.cli import compose
from ppo_train.config_check import validate
from ppo_train.errors import ConfigError
from ppo_train.data.collate import collate
from ppo_train.data.layout import build_units
from ppo_train.data.packing import plan_epoch
from ppo_train.masks import build_mask
from ppo_train.scoring import PolicyModule
from ppo_train.scoring import forward_scores as batch_logps
from tests.conftest import random_examples, tiny_model

FFD = OmegaConf.create({"name": "ffd", "row_tokens": 512, "rows_per_batch": 4, "pad_multiple": 128})


def _scores(mask_documents: bool, restart=True):
    examples = random_examples(8, 2, seed=9)
    units = build_units(examples, "unmasked")
    module = PolicyModule(tiny_model("llama"))
    (mb,) = plan_epoch(units, FFD, 1, seed=0, epoch=0)[:1]
    batch = collate(units, mb, 0, mask_documents=mask_documents, restart_positions=restart)
    with torch.no_grad():
        out = batch_logps(module, batch, build_mask(batch.doc_ids, batch.segment_ids, "sdpa"))
    first_docs = {(row[0].unit, row[0].lo) for row in mb.rows}
    firsts = [(u, units[u].doc_bounds[k][0]) in first_docs
              for u, k in zip(batch.response_unit.tolist(), batch.response_k.tolist())]
    return out.sums, torch.tensor(firsts)


def test_the_mask_matters_before_training():
    exact, first = _scores(mask_documents=True)
    free, _ = _scores(mask_documents=False)
    diff = (exact - free).abs()
    assert diff[first].max() <= 1e-5, f"the first sequence of a row sees nothing else: {diff[first]}"
    assert bool((diff[~first] > 1e-3).all()), f"mask-free log-probs should differ: {diff[~first]}"
    running, _ = _scores(mask_documents=False, restart=False)
    assert (running - free).abs()[~first].max() > 1e-3, "restart_positions should matter"


@pytest.mark.parametrize("loss", ["dpo", "reward"])
def test_exact_math_losses_are_refused_at_config_time(loss):
    cfg = compose(["layout=unmasked", f"loss={loss}", "model.lora.enabled=true"])
    with pytest.raises(ConfigError, match=f"layout=unmasked with loss={loss}.*use layout=shared"):
        validate(cfg)
    with pytest.raises(ConfigError, match="needs model.lora.enabled=true"):
        validate(compose(["layout=unmasked", "loss=sft"]))


def test_lora_run_saves_adapters_and_a_merged_model_that_matches(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ppo_train.model import load_causal_lm, load_tokenizer
    from ppo_train.train import train

    cfg = compose(["layout=unmasked", "loss=sft", "model.lora.enabled=true", "dataset.num_rows=40",
                   "trainer.max_steps=2", "trainer.lr=1e-2", "logging.progress=false", "run_name=t",
                   "packing.row_tokens=1024"])
    validate(cfg)
    train(cfg, tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    base = load_causal_lm(cfg.model, len(load_tokenizer(cfg.model)), torch.float32, "sdpa", cfg.trainer.seed)
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.randint(0, 1000, (1, 20))
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, adapted(input_ids=ids).logits
        untrained = load_causal_lm(cfg.model, len(load_tokenizer(cfg.model)), torch.float32, "sdpa", cfg.trainer.seed)(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-4, f"merged vs adapters: {(a - b).abs().max()}"
    assert (a - untrained).abs().max() > 1e-4, "training did not move the adapters"
