"""pptrain at its default settings against TRL's DPOTrainer, on the same model and pairs.

- pptrain: the real `python -m ppo_train` run (DeepSpeed engine, default packing and ZeRO
  choice), pairs/s over the optimizer steps after the first, its own MFU, and the process's
  peak RSS (wait4's ru_maxrss); once at its defaults (trainer.precision=auto: bf16 mixed where
  the CPU or GPU has bf16 units) and once in fp32;
- TRL 1.16 DPOTrainer four times (bench.TRL_RUNS): its own defaults (a reference model beside
  the policy, gradient checkpointing, bf16 mixed precision: autocast over fp32 weights), the
  same in fp32, fp32 with `precompute_ref_log_probs=True`, and its best configuration here, bf16
  mixed with `precompute_ref_log_probs=True`; 8 pairs per step (per_device_train_batch_size 8,
  no accumulation); pairs/s between the end of the warm-up steps and the last step (a
  callback), peak RSS of the worker process, and MFU from the same FLOP model as pptrain's
  (ppo_train/flops.py: the paired layout's work, head at response tokens) against a GEMM peak
  calibrated in that process. The texts are decoded from pptrain's token ids and re-tokenized
  by TRL, so token counts may differ slightly.

`pip install -e '.[trl]'` (trl==1.16.0); run through `python scripts/bench.py --vs-trl`.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import BenchOptions, point_config

TRL_PAIRS_PER_STEP = 8


def pptrain_default(overrides: list[str], steps: int) -> dict:
    """The real trainer at its defaults (what `pptrain <overrides>` does), in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "ppo_train", f"hydra.run.dir={tmp}/run", "logging.progress=false",
                "trainer.save_every=0", "trainer.save_model=false", f"trainer.max_steps={steps}", *overrides]
        log = Path(tmp, "log.txt")
        with log.open("w") as sink:
            proc = subprocess.Popen(args, stdout=sink, stderr=sink)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (peak RSS)
            proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"pptrain failed:\n{log.read_text()[-3000:]}")
        rows = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
        report = json.loads(Path(tmp, "run", "data_report.json").read_text())
    timed = [r for r in rows if "loss" in r][1:]  # the first step warms up
    seconds = sum(r["step_seconds"] for r in timed)
    mfu = None if any(r.get("mfu") is None for r in timed) else sum(r["mfu"] * r["step_seconds"] for r in timed) / seconds
    return {"pairs_per_s": sum(r["pairs"] for r in timed) / seconds, "steps": len(timed), "mfu": mfu,
            "precision": rows[0].get("precision"), "final_loss": timed[-1]["loss"] if timed else None,
            "peak_rss_mib": usage.ru_maxrss / 1024, "peak_gflops": rows[-1].get("peak_flops_per_s", 0) / 1e9,
            "pairs_per_step": sum(r["pairs"] for r in timed) / len(timed),
            "examples": report["train_examples"]}


def trl_baseline(overrides: list[str], opts: BenchOptions, precompute: bool,
                 bf16: bool) -> dict:  # pragma: no cover - needs trl
    """TRL's DPOTrainer on the same model (fp32 weights) and pairs; see the module docstring.
    `bf16`: TRL's default bf16 mixed precision (autocast over the fp32 weights), else fp32."""
    import datasets
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    import probe
    from ppo_train.data.layout import build_units
    from ppo_train.dist import device_for
    from ppo_train.flops import FlopCounter, ModelShape, peak_flops
    from ppo_train.model import load_causal_lm, load_tokenizer
    from ppo_train.stats import comparable_examples

    cfg = point_config(overrides, "paired", "none")
    t, tok = cfg.trainer, load_tokenizer(cfg.model)
    examples = comparable_examples(cfg, tok)[0][: opts.num_units]
    text = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731 - TRL adds EOS itself
    rows = [{"prompt": text(ex.prompt_ids), "chosen": text(ex.response_ids[w]), "rejected": text(ex.response_ids[lo])}
            for ex in examples for w, lo in ex.pairs]
    timed = -(-len(rows) // TRL_PAIRS_PER_STEP)
    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks[state.global_step] = time.perf_counter()

    device = device_for(cfg.trainer.device)
    longest = max(len(ex.prompt_ids) + max(len(r) for r in ex.response_ids) for ex in examples)
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench_trl_"), per_device_train_batch_size=TRL_PAIRS_PER_STEP,
                     gradient_accumulation_steps=1, max_steps=opts.warmup_steps + timed, learning_rate=t.lr,
                     lr_scheduler_type="constant", beta=cfg.loss.beta, max_length=longest + 8,
                     precompute_ref_log_probs=precompute, report_to="none", save_strategy="no", seed=t.seed,
                     use_cpu=device.type == "cpu", dataloader_num_workers=0, bf16=bf16)
    model = load_causal_lm(cfg.model, len(tok), torch.float32, "sdpa", t.seed)
    units = build_units(examples, "paired")
    counter = FlopCounter(ModelShape.of(model), passes=3.0 if precompute else 4.0)  # + the reference forward
    per_pair = sum(counter.shape.forward_flops(u.length, u.visible_pairs(), int(u.resp_len.sum()), u.num_responses)
                   for u in units) * counter.passes / len(rows)
    # TRL's default reference is a second copy of the initial policy (it loads one from the model's
    # name; a random-weight model has none, so it is handed the copy); precompute drops it
    ref_model = None if precompute else copy.deepcopy(model).eval()
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok, callbacks=[Clock()])
    trainer.train()
    first, last = marks.get(opts.warmup_steps), marks[max(marks)]
    pairs = (max(marks) - opts.warmup_steps) * TRL_PAIRS_PER_STEP
    seconds = last - first if first and last > first else None
    peak, _ = peak_flops(device, torch.bfloat16 if args.bf16 else torch.float32)
    return {"trl": __import__("trl").__version__, "precompute_ref_log_probs": precompute, "bf16": bool(args.bf16),
            "gradient_checkpointing": bool(args.gradient_checkpointing), "pairs": len(rows),
            "steps": max(marks), "pairs_per_s": pairs / seconds if seconds else None,
            "mfu": per_pair * pairs / seconds / peak if seconds else None,
            "peak_rss_mib": probe.peak_mib(torch.device("cpu")) if device.type == "cpu" else probe.peak_mib(device)}
