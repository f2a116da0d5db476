"""The first-GPU check, unattended: `make gpu-check` (at most ~8 minutes on one GPU).

Each step runs in a process of its own under its own time cap and records what it saw, or why
it could not run, in <out>/gpu_check.json and gpu_check.md. A step that fails, crashes or runs
out of time is reported and the next one still runs; a step that no longer fits the budget is
reported as not run. The script clears the run folders it owns under <out> first.

1. `gpu_tests`: `pytest -m gpu` (compiled flex vs SDPA forward and backward, compiled-graph
   bounds with LoRA and real gradients, vision rows);
2. `flex_vs_sdpa`: per-response log-probs of the tiny model in bf16 through compiled flex and
   through SDPA on the same micro-batches (per-token means within BF16_TOL nats);
3. `lora_flex_graphs`: the graphs dynamo compiles for flex over an epoch of LoRA training with
   real gradients plus the no-grad passes, packing=none (bound 6, dynamo's limit 8);
4. `tiny_flex_bf16`: a two-step `trainer=gpu` run (flex, bf16): step-1 margins 0 within BF16_TOL
   (the reference is the initial policy) and the run's own self-check numbers;
5. `pretrained_zero3_live`: the model that run exported, loaded back as a pretrained checkpoint
   under ZeRO-3 at world size 1 (partitioned loading, the head under partitioning) with a live
   reference engine, two steps;
6. `separate_reference`: the same checkpoint as a separate reference, cached table (ZeRO-0) and
   live (ZeRO-1), two steps each;
7. `bench`: the benchmark grid, paired+none (sdpa) against shared+ffd (flex);
8. `two_ranks_nccl` (two or more GPUs): a 2-rank NCCL run against one rank with two micro-batches.

    python scripts/gpu_check.py [--out outputs/gpu_check] [--budget 480]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BF16_TOL = 0.05  # nats per token: bf16 keeps ~3 significant digits in every matmul
TINY = ["model=tiny", "trainer=gpu", "trainer.precision=bf16", "dataset.num_rows=64", "logging.progress=false",
        "logging.wandb=disabled", "trainer.save_every=0", "trainer.save_model=false"]
GRAPH_BOUND = 6  # static_shapes: 3 row lengths x (training, no grad)


@dataclass
class Step:
    """One check: `command` runs in its own process for at most `cap` seconds; `judge(result,
    out)` adds what it read from the step's files and sets `ok`."""

    name: str
    cap: float
    command: list[str]
    judge: object = None
    env: dict = field(default_factory=dict)


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run `cmd`; never raises: a missing program, a crash or the time cap is recorded."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(5.0, timeout),
                              env={**os.environ, **(env or {})})
        return {"rc": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
                "tail": (proc.stdout + proc.stderr)[-3000:]}
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return {"rc": None, "seconds": round(time.perf_counter() - start, 1), "timed_out": True,
                "status": f"not run: out of time after {timeout:.0f} s", "tail": out[-3000:]}
    except OSError as err:  # no such program, not executable
        return {"rc": None, "seconds": round(time.perf_counter() - start, 1), "error": f"{type(err).__name__}: {err}"}


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _pptrain(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "ppo_train", f"hydra.run.dir={run_dir}", *overrides]


def _training_judge(steps: int, margins: bool = False):
    """ok when the run exited 0 with `steps` rows; records losses, margins and the self-check."""

    def judge(result: dict, run_dir: Path) -> None:
        rows = [r for r in _metrics(run_dir) if "loss" in r]
        result["steps"] = [{k: r.get(k) for k in ("step", "loss", "rewards/margins", "tokens_per_s")} for r in rows]
        if rows:
            result["self_check"] = {k: v for k, v in rows[0].items() if k.startswith("self_check")}
        result["ok"] = result.get("rc") == 0 and len(rows) == steps and (
            not margins or abs(rows[0].get("rewards/margins") or 0.0) <= BF16_TOL)

    return judge


def steps(out: Path, gpus: int) -> list[Step]:
    """The checks, in order (their run folders under `out`)."""
    me = [sys.executable, str(Path(__file__).resolve())]
    flex_dir, pretrained = out / "tiny_flex", out / "tiny_flex" / "model"
    two = ["trainer.max_steps=2"]
    out_steps = [
        Step("gpu_tests", 150, [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"]),
        Step("flex_vs_sdpa", 90, [*me, "--in-process", "flex_vs_sdpa", "--out", str(out)]),
        Step("lora_flex_graphs", 120, [*me, "--in-process", "lora_flex_graphs", "--out", str(out)]),
        Step("tiny_flex_bf16", 120, _pptrain(flex_dir, *TINY, *two, "model.attention=flex", "trainer.save_model=true"),
             _training_judge(2, margins=True)),
        Step("pretrained_zero3_live", 120,
             _pptrain(out / "zero3_live", *TINY, *two, "model.from_config=null", f"model.name_or_path={pretrained}",
                      "trainer.zero_stage=3", "reference.live=true"), _training_judge(2)),
        Step("separate_reference_table", 90,
             _pptrain(out / "separate_table", *TINY, *two, f"reference.name_or_path={pretrained}"), _training_judge(2)),
        Step("separate_reference_live", 90,
             _pptrain(out / "separate_live", *TINY, *two, f"reference.name_or_path={pretrained}",
                      "reference.live=true", "trainer.zero_stage=1"), _training_judge(2)),
        Step("bench", 180, [sys.executable, "scripts/bench.py", "--no-trl", "--repeats", "1", "--out",
                            str(out / "bench"), "--grid", "paired:none:sdpa,shared:ffd:flex", "trainer=gpu",
                            "trainer.precision=bf16", "dataset.num_rows=96"], _bench_judge),
    ]
    if gpus >= 2:
        out_steps.append(Step("two_ranks_nccl", 240, [*me, "--in-process", "two_ranks_nccl", "--out", str(out)]))
    return out_steps


def _bench_judge(result: dict, bench_dir: Path) -> None:
    bench_json = bench_dir / "bench.json"
    if bench_json.is_file():
        result["points"] = [{k: p.get(k) for k in ("layout", "packer", "backend", "samples_per_s", "real_tokens_per_s",
                                                    "peak_memory_mib", "compiled_graphs_after_warmup", "speedup")}
                            for p in json.loads(bench_json.read_text())["points"]]
    result["ok"] = result.get("rc") == 0 and bool(result.get("points"))


def run_steps(todo: list[Step], budget: float, out: Path, log=print) -> dict:
    """Each step under min(its cap, what is left of the budget); one that no longer has 30 s is
    reported as not run. In-process steps leave their answer in <out>/<name>.json."""
    began, results = time.perf_counter(), {}
    for step in todo:
        left = budget - (time.perf_counter() - began)
        if left < 30:
            results[step.name] = {"status": f"not run: {max(0.0, left):.0f} s of the budget left", "ok": False}
            continue
        log(f"gpu_check: {step.name} (at most {min(step.cap, left):.0f} s) ...")
        result = _run(step.command, min(step.cap, left), step.env)
        answer = out / f"{step.name}.json"
        if answer.is_file():
            result.update(json.loads(answer.read_text()))
        if step.judge is not None:
            run_dir = Path(next((a.split("=", 1)[1] for a in step.command if a.startswith("hydra.run.dir=")),
                                str(out / "bench")))
            step.judge(result, run_dir)
        result.setdefault("ok", result.get("rc") == 0)
        results[step.name] = result
        log(f"gpu_check: {step.name}: {'ok' if result['ok'] else 'FAILED'} in {result.get('seconds')} s")
    return results


def flex_vs_sdpa() -> dict:
    """Per-response scores through compiled flex and through sdpa (bf16), same micro-batches."""
    import torch
    from torch._dynamo.utils import counters

    from ppo_train.cli import compose
    from ppo_train.inputs import prepare
    from ppo_train.data.schedule import Schedule
    from ppo_train.dist import DistInfo
    from ppo_train.model import attn_implementation, build_policy, load_tokenizer
    from ppo_train.scoring import Scorer

    cfg = compose(TINY + ["run_name=gpu_check"])
    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg, tokenizer)
    device = torch.device("cuda", 0)
    module = build_policy(cfg, tokenizer, DistInfo(0, 1, 0, device)).to(device).eval()
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


def lora_flex_graphs() -> dict:
    """LoRA (q_proj, v_proj) under compiled flex, packing=none, real backward: the graphs dynamo
    compiles over one epoch of training plus the no-grad passes stay within GRAPH_BOUND."""
    import torch
    from torch._dynamo.utils import counters

    from ppo_train.cli import compose
    from ppo_train.inputs import prepare
    from ppo_train.data.schedule import Schedule
    from ppo_train.dist import DistInfo
    from ppo_train.model import build_policy, load_tokenizer
    from ppo_train.scoring import Scorer

    cfg = compose(TINY + ["run_name=gpu_check", "packing=none", "model.lora.enabled=true", "model.attention=flex"])
    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg, tokenizer)
    device = torch.device("cuda", 0)
    module = build_policy(cfg, tokenizer, DistInfo(0, 1, 0, device)).to(device).train()
    scorer = Scorer.from_config(cfg, data.units, tokenizer.pad_token_id, device)
    torch._dynamo.reset()
    before = int(counters["stats"]["unique_graphs"])
    batches = 0
    for step in Schedule(data.units, cfg.packing, cfg.trainer.micro_batch_size, cfg.trainer.seed).steps():
        for mb in step.micro_batches:
            scorer(module, mb).scores.sums.sum().backward()
            with torch.no_grad():
                scorer(module, mb)
            batches += 1
    graphs = int(counters["stats"]["unique_graphs"]) - before
    limit = torch._dynamo.config.recompile_limit
    return {"graphs": graphs, "bound": GRAPH_BOUND, "recompile_limit": limit, "row_lengths": list(scorer.lengths),
            "micro_batches": batches, "ok": graphs <= GRAPH_BOUND < limit}


def two_ranks_nccl(out: Path) -> dict:
    """Two NCCL ranks against one rank with two micro-batches per step (losses within 1e-3 relative)."""
    common = [*TINY, "trainer.max_steps=2", "packing=none", "trainer.micro_batch_size=2"]
    one_dir, two_dir = out / "one_rank", out / "two_ranks"
    one = _run(_pptrain(one_dir, *common, "trainer.grad_accum=2"), 110)
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ppo_train",
                f"hydra.run.dir={two_dir}", *common, "trainer.grad_accum=1"], 110)
    a, b = _metrics(one_dir), _metrics(two_dir)
    diffs = [abs(x["loss"] - y["loss"]) / max(1e-12, abs(x["loss"])) for x, y in zip(a, b)]
    return {"one_rank": one, "two_ranks": two, "relative_loss_diffs": diffs,
            "ok": one["rc"] == 0 and two["rc"] == 0 and len(a) == len(b) == 2 and max(diffs) <= 1e-3}


IN_PROCESS = {"flex_vs_sdpa": lambda out: flex_vs_sdpa(), "lora_flex_graphs": lambda out: lora_flex_graphs(),
              "two_ranks_nccl": two_ranks_nccl}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="outputs/gpu_check")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
    ap.add_argument("--in-process", choices=sorted(IN_PROCESS), help=argparse.SUPPRESS)  # one step, as a child
    args = ap.parse_args(argv)
    out = (REPO / args.out).resolve()
    if args.in_process:
        result = IN_PROCESS[args.in_process](out)
        (out / f"{args.in_process}.json").write_text(json.dumps(result, indent=2) + "\n")
        return result
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    result: dict = {"torch": torch.__version__, "gpus": gpus,
                    "device": torch.cuda.get_device_name(0) if gpus else None, "checks": {}}
    _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    if not gpus:
        result["summary"] = "no GPU is visible (torch.cuda.is_available() is False): nothing was run"
        return _write(result, out)
    began = time.perf_counter()
    result["checks"] = run_steps(steps(out, gpus), args.budget, out)
    if gpus < 2:
        result["checks"]["two_ranks_nccl"] = {"skipped": f"{gpus} GPU visible; the 2-rank NCCL check needs two"}
    result["seconds"] = round(time.perf_counter() - began, 1)
    result["summary"] = ", ".join(f"{name}: {'ok' if c.get('ok') else c.get('status', 'FAILED')}"
                                  for name, c in result["checks"].items() if "skipped" not in c)
    return _write(result, out)


RUN_FOLDERS = ("tiny_flex", "zero3_live", "separate_table", "separate_live", "bench", "one_rank", "two_ranks")


def _clear(out: Path) -> None:
    """Every check starts from nothing: remove the run folders and reports this tool writes
    under `out` (only those: `--out` may name a folder that holds other things)."""
    for name in RUN_FOLDERS:
        shutil.rmtree(out / name, ignore_errors=True)
    for name in [*IN_PROCESS, "gpu_check"]:
        for suffix in (".json", ".md"):
            (out / f"{name}{suffix}").unlink(missing_ok=True)


def _write(result: dict, out: Path) -> dict:
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# pptrain GPU check ({result.get('device') or 'no GPU'}, {result['gpus']} visible, torch "
             f"{result['torch']})", "", result.get("summary", ""), ""]
    for name, check in result["checks"].items():
        status = "skipped" if "skipped" in check else ("ok" if check.get("ok") else check.get("status", "FAILED"))
        lines.append(f"- **{name}**: {status} " + json.dumps({k: v for k, v in check.items() if k != "tail"})[:600])
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
