"""The TRL baseline of the benchmark: TRL's DPOTrainer on the same model and examples
(`pip install -e '.[trl]'`); run in a worker process by scripts/bench.py."""

from __future__ import annotations

import tempfile
import time

import torch

from bench import BenchOptions, point_config


def trl_baseline(overrides: list[str], opts: BenchOptions) -> dict:  # pragma: no cover - needs trl
    """TRL's DPOTrainer on the same model, examples and prompts per step (its own paired,
    padded batches; reference log-probs precomputed like ours). The texts are decoded from
    our token ids and re-tokenized by TRL, so token counts may differ slightly. Timed from
    the end of the warm-up steps to the end, by a callback."""
    import datasets
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from ppo_train.dist import device_for
    from ppo_train.model import load_causal_lm, load_tokenizer
    from ppo_train.stats import comparable_examples

    cfg = point_config(overrides, "paired", "none")
    t, tok = cfg.trainer, load_tokenizer(cfg.model)
    examples = comparable_examples(cfg, tok)[0][: opts.num_units]
    text = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731 - TRL adds EOS itself
    rows = [{"prompt": text(ex.prompt_ids), "chosen": text(ex.response_ids[w]), "rejected": text(ex.response_ids[lo])}
            for ex in examples for w, lo in ex.pairs]
    accum = max(1, -(-opts.units_per_step // t.micro_batch_size))
    timed = -(-len(rows) // (accum * t.micro_batch_size))
    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks[state.global_step] = time.perf_counter()

    device = device_for(cfg.trainer.device)
    longest = max(len(ex.prompt_ids) + max(len(r) for r in ex.response_ids) for ex in examples)
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench_trl_"), per_device_train_batch_size=t.micro_batch_size,
                     gradient_accumulation_steps=accum, max_steps=opts.warmup_steps + timed, learning_rate=t.lr,
                     lr_scheduler_type="constant", beta=cfg.loss.beta, max_length=longest + 8,
                     precompute_ref_log_probs=True, report_to="none", save_strategy="no", seed=t.seed,
                     use_cpu=device.type == "cpu", bf16=str(t.precision) == "bf16", dataloader_num_workers=0)
    dtype = torch.float32 if str(t.precision) == "fp32" else torch.bfloat16
    model = load_causal_lm(cfg.model, len(tok), dtype, "sdpa", t.seed)
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok, callbacks=[Clock()])
    trainer.train()
    first, last = marks.get(opts.warmup_steps), marks[max(marks)]
    samples = (max(marks) - opts.warmup_steps) * accum * t.micro_batch_size
    return {"trl": __import__("trl").__version__, "pairs": len(rows), "steps": max(marks),
            "samples_per_s": samples / (last - first) if first and last > first else None}
