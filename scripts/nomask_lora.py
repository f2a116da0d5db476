"""Measure layout=unmasked (packing without a mask, LoRA on q/v) against exact masking.

    python scripts/nomask_lora.py [overrides...]     # CPU default: tiny model, bundled HH-RLHF, SFT

1. Contamination: on the held-out split, per-token |log p(mask-free) - log p(exact)| (mean and
   max), before training and after a mask-free LoRA run, for the same adapters.
2. Speed: samples/s (prompts/s) of the mask-free run vs exact shared+ffd and paired+ffd runs
   at the same row budget (mean over steps after the first), in this one process.
3. Quality: held-out SFT loss (per-token NLL of the chosen answer, computed exactly, with the
   document mask) of the model merged after each run.
Writes outputs/nomask_lora/{nomask_lora.json, nomask_lora.md}.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ppo_train.cli import compose
from ppo_train.data.layout import build_units
from ppo_train.data.packing import plan_epoch
from ppo_train.inputs import prepare
from ppo_train.logps import token_logps
from ppo_train.lora import apply_lora
from ppo_train.model import load_causal_lm, load_tokenizer
from ppo_train.scoring import Scorer, decoder_and_head
from ppo_train.train import train

BASE = ["loss=sft", "model.lora.enabled=true", "model.lora.r=16", "dataset.num_rows=300",
        "dataset.eval_fraction=0.2", "trainer.epochs=2", "trainer.lr=2e-3", "packing=ffd",
        "packing.row_tokens=1024", "packing.rows_per_batch=2", "logging.progress=false", "run_name=nomask",
        "trainer.save_every=0"]


@torch.no_grad()
def token_values(model, units, cfg, exact: bool = True):
    """(token log-probs (T,), the batch each came from) of every response of `units`, ffd-packed,
    in plan order; `exact=False` packs them under a causal mask only (layout=unmasked)."""
    body, head = decoder_and_head(model)
    scorer = Scorer(units, pad_id=0, mask_documents=exact)
    for mb in plan_epoch(units, cfg.packing, 1, 0, 0):
        batch = scorer.batch(mb)
        hidden = body(input_ids=batch.input_ids, position_ids=batch.position_ids,
                      attention_mask=scorer.mask(batch)).last_hidden_state
        yield token_logps(hidden, batch.pred_index, batch.target_ids, head), batch


def per_token(model, units, cfg, exact: bool) -> torch.Tensor:
    return torch.cat([values for values, _ in token_values(model, units, cfg, exact)])


def contamination(model, units, cfg) -> dict:
    diff = (per_token(model, units, cfg, False) - per_token(model, units, cfg, True)).abs()
    return {"mean_abs_per_token": float(diff.mean()), "max_abs_per_token": float(diff.max())}


def exact_heldout_nll(model, eval_units, cfg) -> float:
    """Mean per-token NLL of the preferred answers, exact mask."""
    lps, count = 0.0, 0
    for tok, batch in token_values(model, eval_units, cfg):
        chosen = batch.response_k[batch.target_response] == 0
        lps += float(tok[chosen].sum())
        count += int(chosen.sum())
    return -lps / count


def main(argv: list[str]) -> dict:
    out_dir = Path("outputs/nomask_lora")
    overrides = BASE + argv
    cfg = compose(overrides + ["layout=unmasked"])
    tok = load_tokenizer(cfg.model)
    data = prepare(cfg, tok)
    eval_units = data.eval_units  # paired-style sequences (the unmasked layout's units)
    fresh = load_causal_lm(cfg.model, len(tok), torch.float32, "sdpa", cfg.trainer.seed)
    _, before_model = apply_lora(fresh, cfg.model.lora)  # B = 0: the adapters start as the identity
    result = {"config": overrides, "contamination_before": contamination(before_model.eval(), eval_units, cfg)}
    # the exact runs first: the mask-free one then gets no start-up advantage
    runs = {"shared+ffd exact (LoRA)": ["layout=shared"], "paired+ffd exact (LoRA)": ["layout=paired"],
            "unmasked+ffd (LoRA)": ["layout=unmasked"]}
    for name, extra in runs.items():
        run_dir = out_dir / name.split()[0].replace("+", "_")
        shutil.rmtree(run_dir, ignore_errors=True)  # this script's own folder: a new measurement each time
        rows = [r for r in train(compose(overrides + extra), run_dir) if r.get("loss") is not None]
        merged = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
        result[name] = {"samples_per_s": sum(r["samples_per_s"] for r in rows[1:]) / max(1, len(rows) - 1),
                        "steps": len(rows), "heldout_nll_exact": exact_heldout_nll(merged, build_units(
                            data.eval_examples, "shared"), compose(overrides + ["layout=shared"]))}
        if extra == ["layout=unmasked"]:
            result["contamination_after"] = contamination(merged, eval_units, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "nomask_lora.json").write_text(json.dumps(result, indent=2))
    lines = ["| run | samples/s | held-out NLL (exact) |", "|---|---|---|"]
    for name in runs:
        lines.append(f"| {name} | {result[name]['samples_per_s']:.2f} | {result[name]['heldout_nll_exact']:.4f} |")
    for when in ("before", "after"):
        c = result[f"contamination_{when}"]
        lines.append(f"\ncontamination {when} training: mean |dlogp| per token {c['mean_abs_per_token']:.4f}, "
                     f"max {c['max_abs_per_token']:.4f}")
    (out_dir / "nomask_lora.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
