"""The first-GPU check, unattended: `make gpu-check` (at most ~8 minutes on one GPU).

Runs, each in its own process with a time limit, and records what it saw (or why it could
not run) in outputs/gpu_check/gpu_check.json and gpu_check.md; it never stops at the first
failure and never crashes on a missing piece:

1. `pytest -m gpu` (the GPU-marked tests);
2. flex vs sdpa: per-response log-probs of the tiny model in bf16 on the GPU through the
   compiled FlexAttention path and through SDPA with the dense mask, on the same micro-batches
   (tolerance: per-token mean log-probs within BF16_TOL nats), plus the number of graphs
   dynamo compiled for flex;
3. a two-step `tiny` training run in bf16 with model.attention=flex (step-1 margins must be 0
   within BF16_TOL: the reference is the initial policy);
4. the benchmark grid on the GPU: paired+none (sdpa) vs shared+ffd (flex): samples/s, tokens/s,
   peak memory and compiled graphs per point;
5. with two or more GPUs: a 2-rank NCCL DPO run of two steps against one rank with two
   micro-batches per step (losses equal within 1e-3 relative in bf16).

    python scripts/gpu_check.py [--out outputs/gpu_check] [--budget 480]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BF16_TOL = 0.05  # nats per token: bf16 keeps ~3 significant digits in every matmul
TINY = ["model=tiny", "trainer=gpu", "trainer.precision=bf16", "dataset.num_rows=64", "logging.progress=false",
        "logging.wandb=disabled", "trainer.save_every=0", "trainer.save_model=false"]


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(5.0, timeout),
                              env={**os.environ, **(env or {})})
        return {"rc": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
                "tail": (proc.stdout + proc.stderr)[-3000:]}
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return {"rc": None, "seconds": round(time.perf_counter() - start, 1), "timed_out": True, "tail": out[-3000:]}


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def flex_vs_sdpa() -> dict:
    """In this process: per-response scores through compiled flex and through sdpa (bf16)."""
    import torch
    from torch._dynamo.utils import counters

    from ppo_train.cli import compose
    from ppo_train.data.pipeline import prepare
    from ppo_train.data.schedule import Schedule
    from ppo_train.dist import SINGLE
    from ppo_train.model import attn_implementation, build_policy, load_tokenizer
    from ppo_train.scoring import Scorer

    cfg = compose(TINY + ["run_name=gpu_check"])
    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg, tokenizer)
    device = torch.device("cuda", 0)
    module = build_policy(cfg, tokenizer, SINGLE).to(device).eval()
    plan = Schedule(data.units, cfg.packing, cfg.trainer.micro_batch_size, cfg.trainer.seed).plan(0)
    worst, responses = 0.0, 0
    graphs_before = int(counters["stats"]["unique_graphs"])
    with torch.no_grad():
        for mb in plan:
            got = {}
            for backend in ("flex", "sdpa"):
                scorer = Scorer(data.units, tokenizer.pad_token_id, backend, device, cfg.packing.pad_multiple)
                module.model.set_attn_implementation(attn_implementation(backend))
                scores = scorer(module, mb).scores
                got[backend] = (scores.sums / scores.counts.clamp(min=1)).float().cpu()
            worst = max(worst, float((got["flex"] - got["sdpa"]).abs().max()))
            responses += got["flex"].numel()
    return {"responses": responses, "max_abs_diff_mean_logp": worst, "tolerance": BF16_TOL,
            "ok": worst <= BF16_TOL, "compiled_graphs": int(counters["stats"]["unique_graphs"]) - graphs_before}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="outputs/gpu_check")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
    args = ap.parse_args(argv)
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    left = lambda: args.budget - (time.perf_counter() - began)  # noqa: E731
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    result: dict = {"torch": torch.__version__, "gpus": gpus,
                    "device": torch.cuda.get_device_name(0) if gpus else None, "checks": {}}
    if not gpus:
        result["summary"] = "no GPU is visible (torch.cuda.is_available() is False): nothing was run"
        return _write(result, out)
    checks = result["checks"]
    checks["gpu_tests"] = _run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], min(150, left()))
    try:
        checks["flex_vs_sdpa"] = flex_vs_sdpa()
    except Exception as err:  # noqa: BLE001 - recorded, the other checks still run
        checks["flex_vs_sdpa"] = {"ok": False, "error": f"{type(err).__name__}: {err}"[-2000:]}
    run_dir = out / "tiny_flex"
    run = _run([sys.executable, "-m", "ppo_train", f"hydra.run.dir={run_dir}", *TINY, "model.attention=flex",
                "trainer.max_steps=2"], min(150, left()))
    rows = [r for r in _metrics(run_dir) if "loss" in r]
    run["steps"] = [{k: r.get(k) for k in ("step", "loss", "rewards/margins", "tokens_per_s")} for r in rows]
    run["ok"] = run["rc"] == 0 and len(rows) == 2 and abs(rows[0]["rewards/margins"]) <= BF16_TOL
    checks["tiny_flex_bf16"] = run
    bench = _run([sys.executable, "scripts/bench.py", "--no-trl", "--repeats", "1", "--out", str(out / "bench"),
                  "--grid", "paired:none,shared:ffd", "trainer=gpu", "trainer.precision=bf16",
                  "dataset.num_rows=96"], min(180, left()))
    bench_json = out / "bench" / "bench.json"
    if bench_json.is_file():
        bench["points"] = [{k: p.get(k) for k in ("layout", "packer", "backend", "samples_per_s", "real_tokens_per_s",
                                                   "peak_memory_mib", "compiled_graphs_after_warmup", "speedup")}
                           for p in json.loads(bench_json.read_text())["points"]]
    checks["bench"] = bench
    if gpus >= 2:
        common = [*TINY, "trainer.max_steps=2", "packing=none", "trainer.micro_batch_size=2"]
        one_dir, two_dir = out / "one_rank", out / "two_ranks"
        one = _run([sys.executable, "-m", "ppo_train", f"hydra.run.dir={one_dir}", *common, "trainer.grad_accum=2"],
                   min(120, left()))
        two = _run(["torchrun", "--nproc_per_node", "2", "-m", "ppo_train", f"hydra.run.dir={two_dir}", *common,
                    "trainer.grad_accum=1"], min(120, left()))
        a, b = _metrics(one_dir), _metrics(two_dir)
        diffs = [abs(x["loss"] - y["loss"]) / max(1e-12, abs(x["loss"])) for x, y in zip(a, b)]
        checks["two_ranks_nccl"] = {"one_rank": one, "two_ranks": two, "relative_loss_diffs": diffs,
                                    "ok": one["rc"] == 0 and two["rc"] == 0 and len(a) == len(b) == 2
                                    and max(diffs) <= 1e-3}
    else:
        checks["two_ranks_nccl"] = {"skipped": f"{gpus} GPU visible; the 2-rank NCCL check needs two"}
    result["seconds"] = round(time.perf_counter() - began, 1)
    result["summary"] = ", ".join(f"{name}: {'ok' if c.get('ok', c.get('rc') == 0) else 'FAILED'}"
                                  for name, c in checks.items() if "skipped" not in c)
    return _write(result, out)


def _write(result: dict, out: Path) -> dict:
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# pptrain GPU check ({result.get('device') or 'no GPU'}, {result['gpus']} visible, torch "
             f"{result['torch']})", "", result.get("summary", ""), ""]
    for name, check in result["checks"].items():
        status = "skipped" if "skipped" in check else ("ok" if check.get("ok", check.get("rc") == 0) else "FAILED")
        lines.append(f"- **{name}**: {status} " + json.dumps({k: v for k, v in check.items() if k != "tail"})[:600])
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
