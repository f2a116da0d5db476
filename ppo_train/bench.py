"""The benchmark grid: layout {paired, shared} x packing {none, ffd, sorted}, real DPO steps.

Method (every choice here keeps the grid points comparable):

- Config: `compose([*overrides, "layout=L", "packing=P", "run_name=bench"])`, so a point is
  exactly what `pptrain layout=L packing=P ...` would train.
- Data: the same examples everywhere: `stats.comparable_examples` (those whose paired unit
  fits one ffd row), the first `num_units` of them, laid out per point.
- Model: `load_causal_lm` with `trainer.seed`, so every point starts from the same weights.
- Reference: one untimed no-grad pass of the initial model (`reference.compute_reference`,
  same layout, plan and mask as the point).
- Optimizer: plain `torch.optim.AdamW` (lr `trainer.lr`, constant; clipping at
  `trainer.max_grad_norm`), not the DeepSpeed `Engine`: a step here is a variable number
  of micro-batches, which DeepSpeed's fixed `gradient_accumulation_steps` cannot express,
  and ZeRO-3's per-module hooks would add a per-micro-batch cost that is neither layout
  nor packing. The loss is normalized by the step's pair count, as in train.py.
- Step: consecutive micro-batches of the epoch plan until they hold >= `units_per_step`
  prompts (ffd micro-batches hold many prompts, none/sorted `trainer.micro_batch_size`).
- Warm-up: the first `warmup_steps` steps of the epoch-1 plan (same units, another order),
  untimed. Timed: full passes over the epoch-0 plan, so every point processes exactly
  the same prompts; samples/s = prompts / seconds of the fastest of `repeats` passes
  (`other_cpu_share` says how much other processes used the CPU during it).
- Memory: each point runs in a fresh subprocess by default; on the CPU the peak RSS
  (VmHWM) is reset after the warm-up (so it covers the timed passes) through /proc/self/clear_refs where the kernel
  allows it (else it is the process's peak since start); on CUDA it is
  `torch.cuda.max_memory_allocated` over the timed pass.
- Compiles: new dynamo graphs during the timed pass (`counters["stats"]["unique_graphs"]`);
  0 means no recompilation after the warm-up (the CUDA flex path compiles attention).

Speedups are relative to paired+none. Two ideals are reported beside the achieved one:
`ideal_padded` = padded tokens of paired+none / padded tokens of the point (prefix sharing
and packing together, counting every processed slot), and `ideal_prefix` = the
prefix-sharing token ratio from `stats` (shared layouts; 1 for paired). The plot shows
achieved against `ideal_padded`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

GRID = [(layout, packer) for layout in ("paired", "shared") for packer in ("none", "ffd", "sorted")]
BIG_MODEL = ["model.from_config.hidden_size=512", "model.from_config.num_hidden_layers=8",
             "model.from_config.intermediate_size=1536", "model.from_config.num_attention_heads=8",
             "model.from_config.num_key_value_heads=4"]


@dataclass
class BenchOptions:
    grid: list = field(default_factory=lambda: list(GRID))  # (layout, packer) pairs
    warmup_steps: int = 1
    units_per_step: int = 16  # prompts per optimizer step
    num_units: int | None = None  # cap on the examples used (None = all prepared)
    repeats: int = 2  # timed passes per point; the fastest is reported
    threads: int | None = None  # torch intra-op threads (None = torch's default)
    subprocess: bool = True  # one fresh process per point (honest peak memory)
    trl: bool = True  # try TRL's DPOTrainer as a baseline when trl is importable


def point_config(overrides: list[str], layout: str, packer: str):
    from ppo_train.cli import compose

    return compose([*overrides, f"layout={layout}", f"packing={packer}", "run_name=bench"])


def _device(cfg) -> torch.device:
    want = cfg.trainer.device
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    return torch.device("cuda") if use_cuda else torch.device("cpu")


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # time what the GPU did, not what was queued
    return time.perf_counter()


def _status_mib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> str:
    """Start a fresh peak; returns what the later peak covers."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "timed passes (cuda max allocated)"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return "timed passes (VmHWM reset after the warm-up)"
    except OSError:
        return "whole process (VmHWM, no reset)"


def peak_memory_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_mib("VmHWM")


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def other_cpu_share(before, after, seconds: float) -> float | None:
    """Share of the machine's CPU time used by other processes during a timed pass: the
    timings are only comparable when it is near 0 (a busy 2-core machine slows an
    OpenMP-threaded run far more than the share itself)."""
    if before is None or after is None or seconds <= 0:
        return None
    other = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, other / (seconds * (os.cpu_count() or 1)))


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def group_by_units(plan: list, units_per_step: int) -> list[list]:
    """Consecutive micro-batches, cut once a group holds >= units_per_step prompts."""
    steps, current, count = [], [], 0
    for mb in plan:
        current.append(mb)
        count += len(mb.units)
        if count >= units_per_step:
            steps.append(current)
            current, count = [], 0
    if current:
        steps.append(current)
    return steps


@dataclass
class Tally:
    units: int = 0
    pairs: int = 0
    micro_batches: int = 0
    steps: int = 0
    real_tokens: int = 0
    total_tokens: int = 0
    mask_s: float = 0.0
    collate_s: float = 0.0
    last_loss: float = float("nan")


def train_steps(ctx: dict, steps: list[list], tally: Tally) -> None:
    """Real DPO optimizer steps over micro-batch groups (mask building timed apart)."""
    from ppo_train.data.collate import collate
    from ppo_train.masks import build_mask
    from ppo_train.model import batch_logps

    units, device, cfg = ctx["units"], ctx["device"], ctx["cfg"]
    for group in steps:
        step_pairs = sum(len(units[u].pairs) for mb in group for u in mb.units)
        loss_sum = 0.0
        for mb in group:
            t0 = time.perf_counter()
            batch = collate(units, mb, ctx["pad_id"], cfg.packing.pad_multiple).to(device)
            t1 = _sync(device)
            mask = build_mask(batch.doc_ids, batch.segment_ids, ctx["backend"])
            tally.mask_s += _sync(device) - t1
            tally.collate_s += t1 - t0
            policy = batch_logps(ctx["module"], batch, mask)
            ref = ctx["reference"].scores(batch) if ctx["reference"] is not None else None
            per_pair, _ = ctx["loss_fn"](policy, ref, batch.pairs, cfg.loss)
            loss = per_pair.sum() / max(step_pairs, 1)
            loss.backward()
            loss_sum += float(loss.detach())
            tally.units += len(mb.units)
            tally.pairs += batch.num_pairs
            tally.micro_batches += 1
            tally.real_tokens += batch.real_tokens
            tally.total_tokens += batch.shape[0] * batch.shape[1]
        torch.nn.utils.clip_grad_norm_(ctx["module"].parameters(), cfg.trainer.max_grad_norm)
        ctx["optimizer"].step()
        ctx["optimizer"].zero_grad(set_to_none=True)
        tally.steps += 1
        tally.last_loss = loss_sum


def setup_point(overrides: list[str], layout: str, packer: str, opts: BenchOptions) -> dict:
    """Config, data, model, optimizer and reference log-probs of one grid point."""
    from ppo_train.data.layout import build_units
    from ppo_train.data.packing import plan_epoch
    from ppo_train.engine import dtype_of
    from ppo_train.losses import LOSSES, NEEDS_REFERENCE, REWARD_MODEL
    from ppo_train.masks import resolve_backend
    from ppo_train.model import PolicyModule, load_causal_lm, load_tokenizer
    from ppo_train.reference import compute_reference
    from ppo_train.stats import comparable_examples

    cfg = point_config(overrides, layout, packer)
    if cfg.loss.name in REWARD_MODEL:
        raise ValueError(f"loss={cfg.loss.name}: the benchmark trains causal-LM losses only")
    device = _device(cfg)
    torch.manual_seed(cfg.trainer.seed)
    tokenizer = load_tokenizer(cfg.model)
    examples = comparable_examples(cfg, tokenizer)[0][: opts.num_units]
    units = build_units(examples, layout)
    t = cfg.trainer
    plans = [plan_epoch(units, cfg.packing, t.micro_batch_size, t.seed, epoch) for epoch in (0, 1)]
    rss_before_model = _status_mib("VmRSS")
    backend = resolve_backend(cfg.model.attention, device)
    model = load_causal_lm(cfg.model, len(tokenizer), dtype_of(t.precision), backend, t.seed)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = PolicyModule(model, cfg.model.logits_chunk).to(device).train()
    start = time.perf_counter()
    reference = None
    if NEEDS_REFERENCE[cfg.loss.name]:
        reference = compute_reference(module, units, plans[0], backend, tokenizer.pad_token_id, device, 0, 1, "bench")
    optimizer = torch.optim.AdamW(module.parameters(), lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                  weight_decay=t.weight_decay)
    return {"cfg": cfg, "device": device, "backend": backend, "units": units, "plans": plans,
            "module": module, "optimizer": optimizer, "reference": reference, "loss_fn": LOSSES[cfg.loss.name],
            "pad_id": tokenizer.pad_token_id, "reference_s": time.perf_counter() - start,
            "rss_before_model_mib": rss_before_model,
            "params": sum(p.numel() for p in module.parameters())}


def run_point(overrides: list[str], layout: str, packer: str, opts: BenchOptions) -> dict:
    """Warm up, then time full passes over the same units (the fastest of `repeats` counts:
    interference from other work only ever slows a pass down); one result row."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    ctx = setup_point(overrides, layout, packer, opts)
    device = ctx["device"]
    warm = Tally()
    train_steps(ctx, group_by_units(ctx["plans"][1], opts.units_per_step)[: opts.warmup_steps], warm)
    scope = reset_peak_memory(device)
    graphs = _compiled_graphs()
    passes = []
    for _ in range(max(1, opts.repeats)):
        tally = Tally()
        cpu_before, start = _cpu_seconds(), _sync(device)
        train_steps(ctx, group_by_units(ctx["plans"][0], opts.units_per_step), tally)
        seconds = _sync(device) - start
        passes.append((seconds, other_cpu_share(cpu_before, _cpu_seconds(), seconds), tally))
    seconds, other, tally = min(passes, key=lambda item: item[0])
    return {
        "layout": layout, "packer": packer, "device": str(device), "backend": ctx["backend"],
        "params": ctx["params"], "threads": torch.get_num_threads(), "units": tally.units,
        "pairs": tally.pairs, "steps": tally.steps, "micro_batches": tally.micro_batches,
        "warmup_steps": warm.steps, "seconds": seconds, "samples_per_s": tally.units / seconds,
        "real_tokens": tally.real_tokens, "total_tokens": tally.total_tokens,
        "real_tokens_per_s": tally.real_tokens / seconds,
        "pad_fraction": 1.0 - tally.real_tokens / tally.total_tokens,
        "mask_s_per_step": tally.mask_s / tally.steps, "mask_fraction": tally.mask_s / seconds,
        "collate_s_per_step": tally.collate_s / tally.steps, "reference_s": ctx["reference_s"],
        "peak_memory_mib": peak_memory_mib(device), "peak_memory_scope": scope,
        "rss_before_model_mib": ctx["rss_before_model_mib"],
        "compiled_graphs_after_warmup": _compiled_graphs() - graphs, "last_step_loss": tally.last_loss,
        "other_cpu_share": other, "pass_seconds": [round(item[0], 3) for item in passes],
    }


def _in_subprocess(spec: dict) -> dict:
    """Run `spec` through `python -m ppo_train.bench --worker` and read its JSON answer."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-m", "ppo_train.bench", "--worker", str(spec_path), str(out_path)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out_path.is_file():
            raise RuntimeError(f"benchmark worker {spec.get('layout')}/{spec.get('packer')} failed "
                               f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out_path.read_text())


def worker(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    opts = BenchOptions(**spec["opts"])
    if spec["kind"] == "trl":  # pragma: no cover - needs trl
        from ppo_train.bench_trl import trl_baseline

        result = trl_baseline(spec["overrides"], opts)
    else:
        result = run_point(spec["overrides"], spec["layout"], spec["packer"], opts)
    Path(out_path).write_text(json.dumps(result))


def add_speedups(points: list[dict], stats: dict) -> None:
    """Achieved and ideal speedups relative to paired+none (the first such point)."""
    base = next((p for p in points if p["layout"] == "paired" and p["packer"] == "none"), None)
    for p in points:
        p["ideal_prefix"] = stats["ideal_speedup"] if p["layout"] == "shared" else 1.0
        if base is None:
            p["speedup"] = p["ideal_padded"] = None
            continue
        p["speedup"] = p["samples_per_s"] / base["samples_per_s"]
        p["ideal_padded"] = base["total_tokens"] / p["total_tokens"]
        p["efficiency"] = p["speedup"] / p["ideal_padded"]


def run_grid(overrides: list[str], opts: BenchOptions, log=print) -> dict:
    """Every grid point (fresh subprocesses unless opts.subprocess is False) plus stats."""
    from ppo_train.model import load_tokenizer
    from ppo_train.stats import dataset_stats

    cfg = point_config(overrides, "shared", "ffd")
    stats = dataset_stats(cfg, load_tokenizer(cfg.model), limit=opts.num_units)
    points = []
    for layout, packer in opts.grid:
        log(f"bench: {layout}+{packer} ...")
        if opts.subprocess:
            spec = {"kind": "point", "overrides": overrides, "layout": layout, "packer": packer, "opts": asdict(opts)}
            row = _in_subprocess(spec)
        else:
            row = run_point(overrides, layout, packer, opts)
        log(f"bench: {layout}+{packer}: {row['samples_per_s']:.2f} samples/s in {row['seconds']:.1f} s")
        points.append(row)
    add_speedups(points, stats)
    return {"overrides": overrides, "options": asdict(opts), "torch": torch.__version__,
            "stats": stats, "points": points, "trl": _trl(overrides, opts)}


def _trl(overrides: list[str], opts: BenchOptions) -> dict:
    try:
        import trl  # noqa: F401
    except ImportError:
        return {"skipped": "trl is not installed (pip install -e '.[trl]' to add the baseline)"}
    if not opts.trl:
        return {"skipped": "disabled (--no-trl)"}
    try:  # pragma: no cover - trl is not installed where the tests run
        return _in_subprocess({"kind": "trl", "overrides": overrides, "opts": asdict(opts)})
    except Exception as err:  # noqa: BLE001 - a broken baseline must not lose the grid's results
        return {"error": str(err)[-2000:]}


def _merge_overrides(defaults: list[str], user: list[str]) -> list[str]:
    """Defaults first, dropping any key the user sets (Hydra rejects a key given twice)."""
    keys = {u.split("=", 1)[0].lstrip("+~") for u in user}
    return [d for d in defaults if d.split("=", 1)[0] not in keys] + list(user)


def parse_args(argv: list[str] | None = None):
    import argparse

    ap = argparse.ArgumentParser(prog="scripts/bench.py", description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="config overrides as for pptrain, e.g. dataset.num_rows=64")
    ap.add_argument("--out", default="outputs/bench", help="output folder (bench.json, bench.md, bench.png)")
    ap.add_argument("--grid", default=None, help="comma list of layout:packer, e.g. paired:none,shared:ffd")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up optimizer steps")
    ap.add_argument("--units-per-step", type=int, default=16, help="prompts per optimizer step")
    ap.add_argument("--num-units", type=int, default=None, help="cap on the prompts in the timed pass")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per point (the fastest counts)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per point (default: torch's)")
    ap.add_argument("--big", action="store_true", help="a ~50M-parameter Llama (hidden 512, 8 layers), fewer rows")
    ap.add_argument("--in-process", action="store_true", help="no subprocess per point (peak memory then shared)")
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL baseline even when trl is installed")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """`python scripts/bench.py [--big] [overrides...]`: run the grid, write JSON, Markdown, PNG."""
    args = parse_args(argv)
    defaults = ["model=tiny", "dataset.num_rows=48" if args.big else "dataset.num_rows=160"]
    overrides = _merge_overrides(defaults + (BIG_MODEL if args.big else []), args.overrides)
    grid = [tuple(item.split(":")) for item in args.grid.split(",")] if args.grid else list(GRID)
    opts = BenchOptions(grid=grid, warmup_steps=args.warmup, units_per_step=args.units_per_step,
                        num_units=args.num_units, repeats=args.repeats, threads=args.threads,
                        subprocess=not args.in_process,
                        trl=not args.no_trl)
    start = time.perf_counter()
    result = run_grid(overrides, opts)
    result["wall_s"] = time.perf_counter() - start
    from ppo_train.bench_report import write_outputs

    paths = write_outputs(result, Path(args.out))
    print(Path(paths["markdown"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return result


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
