"""Where the time of a training step goes: `python scripts/profile_phases.py [overrides...]`.

Runs pptrain's train() twice in this process on the same command (default: the default job,
first 20 optimizer steps): first without the profiler (it also writes the reference cache, so
the second run has no reference pass), then under torch.profiler. The phases are the
`pptrain.*` ranges the code marks: collate (micro-batch tensors), mask, forward (decoder body),
head (log-probs at response tokens), backward (including the head's recomputation), optimizer
(DeepSpeed's step: clipping, AdamW, scheduler); "other" is the rest of the training loop
(loss, metrics, DeepSpeed and Python bookkeeping). Shares are of the profiled loop; the first
step (warm-up) is excluded from neither run's total, so compare runs, not single steps.

Writes outputs/profile/phases.json and prints a Markdown table.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

PHASES = ("collate", "mask", "forward", "head", "backward", "optimizer")
DEFAULT = ["trainer.max_steps=20", "trainer.save_every=0", "trainer.save_model=false", "logging.progress=false"]


def loop_seconds(rows: list[dict]) -> float:
    return sum(r["step_seconds"] for r in rows if "step_seconds" in r)


def main(argv: list[str]) -> dict:
    from ppo_train.cli import compose
    from ppo_train.train import train

    overrides = [*DEFAULT, *argv, "run_name=profile"]
    out = Path("outputs/profile")
    run_dir = out / "run"
    cfg = compose(overrides)
    began = time.perf_counter()
    shutil.rmtree(run_dir, ignore_errors=True)  # this script's own folder: every train() starts fresh
    plain = train(cfg, run_dir)
    plain_s = loop_seconds(plain)
    shutil.rmtree(run_dir, ignore_errors=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=False) as prof:
        profiled = train(cfg, run_dir)
    loop = loop_seconds(profiled)
    totals = {e.key: e for e in prof.key_averages()}
    phases = {p: totals[f"pptrain.{p}"].cpu_time_total / 1e6 if f"pptrain.{p}" in totals else 0.0 for p in PHASES}
    phases["other"] = max(0.0, loop - sum(phases.values()))
    rows = [r for r in profiled if "mfu" in r]
    result = {"overrides": overrides, "steps": len(rows), "loop_seconds": loop, "loop_seconds_unprofiled": plain_s,
              "phases_seconds": phases, "phases_share": {p: s / loop for p, s in phases.items()},
              "mean_mfu_unprofiled": None if any(r.get("mfu", 0) is None for r in plain)
              else sum(r["mfu"] for r in plain if "mfu" in r) / max(1, len(rows)),
              "samples_per_s_unprofiled": sum(r["samples"] for r in plain if "samples" in r) / plain_s,
              "wall_s": time.perf_counter() - began}
    out.mkdir(parents=True, exist_ok=True)
    (out / "phases.json").write_text(json.dumps(result, indent=2) + "\n")
    mfu = result["mean_mfu_unprofiled"]
    lines = [f"training loop: {loop:.1f} s profiled, {plain_s:.1f} s without the profiler ({len(rows)} steps, "
             f"{result['samples_per_s_unprofiled']:.2f} samples/s, MFU {'-' if mfu is None else f'{mfu:.1%}'})", "",
             "| phase | seconds | share |", "|---|---|---|"]
    lines += [f"| {p} | {s:.2f} | {s / loop:.1%} |" for p, s in phases.items()]
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
