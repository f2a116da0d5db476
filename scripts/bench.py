"""The benchmark grid: layout {paired, shared} x packing {none, ffd, sorted}, real DPO steps.

Method (every choice here keeps the grid points comparable):

- Config: `compose([*overrides, "layout=L", "packing=P", "run_name=bench"])`, so a point is
  exactly what `pptrain layout=L packing=P ...` would train.
- Data: the same examples everywhere: `stats.comparable_examples` (those whose paired unit
  fits one ffd row), the first `num_units` of them, laid out per point.
- Model: `load_causal_lm` with `trainer.seed`, so every point starts from the same weights.
- Reference: one untimed no-grad pass of the initial model (`reference.compute_table`,
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
- Memory: each point runs in a fresh subprocess by default; the peak (scripts/probe.py: RSS
  on the CPU, max allocated on CUDA) is reset after the warm-up, so it covers the timed passes.
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
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import probe

SCRIPT = Path(__file__).resolve()
GRID = [(layout, packer) for layout in ("paired", "shared") for packer in ("none", "ffd", "sorted")]
BIG_MODEL = ["model.from_config.hidden_size=512", "model.from_config.num_hidden_layers=8",
             "model.from_config.intermediate_size=1536", "model.from_config.num_attention_heads=8",
             "model.from_config.num_key_value_heads=4"]


@dataclass
class BenchOptions:
    grid: list = field(default_factory=lambda: list(GRID))  # (layout, packer[, attention backend])
    warmup_steps: int = 1
    units_per_step: int = 16  # prompts per optimizer step
    num_units: int | None = None  # cap on the examples used (None = all prepared)
    repeats: int = 2  # timed passes per point; the fastest is reported
    threads: int | None = None  # torch intra-op threads (None = torch's default)
    subprocess: bool = True  # one fresh process per point (honest peak memory)
    trl: bool = True  # try TRL's DPOTrainer as a baseline when trl is importable


def point_config(overrides: list[str], layout: str, packer: str):
    """What `pptrain <overrides> layout=L packing=P` would train (trainer.precision resolved for
    this machine's device, as train() resolves it)."""
    from ppo_train import precision
    from ppo_train.cli import compose
    from ppo_train.dist import device_for

    cfg = compose([*overrides, f"layout={layout}", f"packing={packer}", "run_name=bench"])
    cfg.trainer.precision = precision.resolve(cfg.trainer.precision, device_for(cfg.trainer.device))
    return cfg


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
    flops: float = 0.0  # model FLOPs the steps needed (ppo_train/flops.py)
    images: int = 0  # images sent through the vision encoder (vision-language data)
    image_tokens: int = 0  # tokens carrying image features
    last_loss: float = float("nan")


def train_steps(ctx: dict, steps: list[list], tally: Tally) -> None:
    """Real optimizer steps over micro-batch groups through the Scorer (collate and mask timed apart)."""
    from ppo_train.scoring import Scored, forward_scores

    units, device, cfg, scorer = ctx["units"], ctx["device"], ctx["cfg"], ctx["scorer"]
    for group in steps:
        step_pairs = sum(int(units.num_pairs[u]) for mb in group for u in mb.units)
        loss_sum = 0.0
        for mb in group:
            t0 = time.perf_counter()
            batch = scorer.batch(mb)
            t1 = probe.sync(device)
            mask = scorer.mask(batch)
            tally.mask_s += probe.sync(device) - t1
            tally.collate_s += t1 - t0
            scored = Scored(batch, mask, forward_scores(ctx["module"], batch, mask))
            ref = ctx["reference"].scores(scored) if ctx["reference"] is not None else None
            # the timed path: each micro-batch's own counts stand in for the step's (StepTotals)
            per_pair, _ = ctx["loss"].fn(scored.scores, ref, batch.pairs, cfg.loss, **ctx["loss"].label_kwargs(batch))
            loss = per_pair.sum() / max(step_pairs, 1)
            loss.backward()
            loss_sum += float(loss.detach())
            tally.units += len(mb.units)
            tally.pairs += batch.num_pairs
            tally.micro_batches += 1
            tally.real_tokens += batch.real_tokens
            tally.total_tokens += batch.shape[0] * batch.shape[1]
            tally.flops += ctx["flops"].of_batch(batch)
            tally.images += batch.images
            tally.image_tokens += batch.image_tokens
        torch.nn.utils.clip_grad_norm_(ctx["module"].parameters(), cfg.trainer.max_grad_norm)
        ctx["optimizer"].step()
        ctx["optimizer"].zero_grad(set_to_none=True)
        tally.steps += 1
        tally.last_loss = loss_sum


def _count_calls(module: torch.nn.Module | None) -> list[int]:
    """A one-element counter of `module`'s forward calls (stays [0] for None: a text model)."""
    calls = [0]
    if module is not None:
        module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def setup_point(overrides: list[str], layout: str, packer: str, opts: BenchOptions) -> dict:
    """Config, data, model, optimizer and reference log-probs of one grid point."""
    from ppo_train.data.layout import build_units
    from ppo_train.data.schedule import Schedule
    from ppo_train.dist import SINGLE, DistInfo, device_for
    from ppo_train.flops import FlopCounter, ModelShape, peak_flops
    from ppo_train.hostmem import for_training
    from ppo_train.losses import LOSSES
    from ppo_train.model import build_policy, image_inputs, load_tokenizer
    from ppo_train.precision import Numerics
    from ppo_train.reference import compute_table
    from ppo_train.scoring import Scorer
    from ppo_train.stats import comparable_examples
    from ppo_train.vision import vision_tower

    cfg = point_config(overrides, layout, packer)
    loss = LOSSES[cfg.loss.name]
    if loss.reward_head:
        raise ValueError(f"loss={cfg.loss.name}: the benchmark trains causal-LM losses only")
    device = device_for(cfg.trainer.device)
    torch.manual_seed(cfg.trainer.seed)
    tokenizer = load_tokenizer(cfg.model)
    examples, data, _ = comparable_examples(cfg, tokenizer)
    examples = examples[: opts.num_units]
    units = build_units(examples, layout)
    t = cfg.trainer
    schedule = Schedule(units, cfg.packing, t.micro_batch_size, t.seed)
    plans = [schedule.plan(0), Schedule(units, cfg.packing, t.micro_batch_size, t.seed).plan(1)]
    rss_before_model = probe.status_mib("VmRSS")
    # built for this device: its attention backend is the one the Scorer resolves below
    module = build_policy(cfg, tokenizer, DistInfo(0, 1, 0, device)).to(device).train()
    scorer = Scorer.from_config(cfg, units, tokenizer.pad_token_id, device, images=image_inputs(data.vision))
    encoder_calls = _count_calls(vision_tower(module.model))
    start = time.perf_counter()
    reference = compute_table(module, scorer, schedule, SINGLE, "bench") if loss.needs_reference else None
    optimizer = torch.optim.AdamW(module.parameters(), lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                  weight_decay=t.weight_decay)
    for_training(t, device)  # as train() does: after the start-up, before the training passes
    return {"cfg": cfg, "device": device, "backend": scorer.backend, "units": units, "plans": plans,
            "module": module, "optimizer": optimizer, "reference": reference, "loss": loss, "scorer": scorer,
            "reference_s": time.perf_counter() - start, "rss_before_model_mib": rss_before_model,
            "params": sum(p.numel() for p in module.parameters()), "encoder_calls": encoder_calls,
            "flops": FlopCounter(ModelShape.of(module.model)), "peak": peak_flops(device, Numerics.of(t, 1).compute_dtype)[0]}


def run_point(overrides: list[str], layout: str, packer: str, opts: BenchOptions) -> dict:
    """Warm up, then time full passes over the same units (the fastest of `repeats` counts:
    interference from other work only ever slows a pass down); one result row."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    ctx = setup_point(overrides, layout, packer, opts)
    device = ctx["device"]
    warm = Tally()
    train_steps(ctx, group_by_units(ctx["plans"][1], opts.units_per_step)[: opts.warmup_steps], warm)
    scope = probe.reset_peak(device)
    graphs = _compiled_graphs()
    passes = []
    for _ in range(max(1, opts.repeats)):
        tally, calls_before = Tally(), ctx["encoder_calls"][0]
        cpu_before, start = probe.cpu_seconds(), probe.sync(device)
        train_steps(ctx, group_by_units(ctx["plans"][0], opts.units_per_step), tally)
        seconds = probe.sync(device) - start
        passes.append((seconds, probe.other_cpu_share(cpu_before, probe.cpu_seconds(), seconds), tally,
                       ctx["encoder_calls"][0] - calls_before))
    seconds, other, tally, encoder_calls = min(passes, key=lambda item: item[0])
    return {
        "layout": layout, "packer": packer, "device": str(device), "backend": ctx["backend"],
        "params": ctx["params"], "threads": torch.get_num_threads(), "units": tally.units,
        "pairs": tally.pairs, "steps": tally.steps, "micro_batches": tally.micro_batches,
        "warmup_steps": warm.steps, "seconds": seconds, "samples_per_s": tally.units / seconds,
        "real_tokens": tally.real_tokens, "total_tokens": tally.total_tokens,
        "real_tokens_per_s": tally.real_tokens / seconds, "pairs_per_s": tally.pairs / seconds,
        "flops_per_s": tally.flops / seconds, "mfu": tally.flops / seconds / ctx["peak"],
        "peak_flops_per_s": ctx["peak"],
        "pad_fraction": 1.0 - tally.real_tokens / tally.total_tokens,
        "tokens_per_step": tally.total_tokens / tally.steps, "real_tokens_per_step": tally.real_tokens / tally.steps,
        "images": tally.images, "image_tokens": tally.image_tokens, "encoder_calls": encoder_calls,
        "mask_s_per_step": tally.mask_s / tally.steps, "mask_fraction": tally.mask_s / seconds,
        "collate_s_per_step": tally.collate_s / tally.steps, "reference_s": ctx["reference_s"],
        "peak_memory_mib": probe.peak_mib(device), "peak_memory_scope": scope,
        "rss_before_model_mib": ctx["rss_before_model_mib"],
        "compiled_graphs_after_warmup": _compiled_graphs() - graphs, "last_step_loss": tally.last_loss,
        "other_cpu_share": other, "pass_seconds": [round(item[0], 3) for item in passes],
    }


def _in_subprocess(spec: dict) -> dict:
    """Run `spec` through `python scripts/bench.py --worker` and read its JSON answer."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, str(SCRIPT), "--worker", str(spec_path), str(out_path)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out_path.is_file():
            raise RuntimeError(f"benchmark worker {spec.get('layout')}/{spec.get('packer')} failed "
                               f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out_path.read_text())


def worker(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    opts = BenchOptions(**spec["opts"])
    if spec["kind"] == "trl":  # pragma: no cover - needs trl
        from bench_trl import trl_baseline

        result = trl_baseline(spec["overrides"], opts, spec["precompute"], spec["bf16"])
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
    for layout, packer, *backend in opts.grid:
        log(f"bench: {layout}+{packer} ...")
        # a third field pins the attention backend of that point (else model.attention decides)
        own = [*overrides, f"model.attention={backend[0]}"] if backend else overrides
        if opts.subprocess:
            spec = {"kind": "point", "overrides": own, "layout": layout, "packer": packer, "opts": asdict(opts)}
            row = _in_subprocess(spec)
        else:
            row = run_point(own, layout, packer, opts)
        log(f"bench: {layout}+{packer}: {row['samples_per_s']:.2f} samples/s in {row['seconds']:.1f} s")
        points.append(row)
    add_speedups(points, stats)
    return {"overrides": overrides, "options": asdict(opts), "torch": torch.__version__,
            "stats": stats, "points": points, "trl": _trl(overrides, opts)}


def _trl(overrides: list[str], opts: BenchOptions, precompute: bool = True, bf16: bool = False) -> dict:
    try:
        import trl  # noqa: F401
    except ImportError:
        return {"skipped": "trl is not installed (pip install -e '.[trl]' to add the baseline)"}
    if not opts.trl:
        return {"skipped": "disabled (--no-trl; --vlm has no TRL baseline)"}
    try:  # pragma: no cover - trl is not installed where the tests run
        return _in_subprocess({"kind": "trl", "overrides": overrides, "opts": asdict(opts), "precompute": precompute,
                               "bf16": bf16})
    except Exception as err:  # noqa: BLE001 - a broken baseline must not lose the grid's results
        return {"error": str(err)[-2000:]}


# TRL 1.16's DPOTrainer: its own defaults (bf16 mixed precision: autocast over fp32 weights, a
# reference model beside the policy), the same in fp32, fp32 with precomputed reference
# log-probs, and its best configuration here (bf16 mixed with precomputed reference log-probs).
TRL_RUNS = (("trl_own_defaults", "TRL defaults (bf16 mixed)", {"precompute": False, "bf16": True}),
            ("trl_fp32", "TRL defaults in fp32", {"precompute": False, "bf16": False}),
            ("trl_fp32_precompute", "TRL fp32, precompute_ref_log_probs", {"precompute": True, "bf16": False}),
            ("trl_best", "TRL bf16 mixed, precompute_ref_log_probs (its best)", {"precompute": True, "bf16": True}))


def _fastest(runs: list[dict]) -> dict:
    """The fastest of a configuration's rounds (what the machine can do with the least
    interference from other work), with every round's pairs/s and the highest peak RSS."""
    ok = [r for r in runs if r.get("pairs_per_s")]
    if not ok:
        return runs[-1]
    best = dict(max(ok, key=lambda r: r["pairs_per_s"]))
    best.update(pairs_per_s_rounds=[r.get("pairs_per_s") for r in runs],
                peak_rss_mib=max(r["peak_rss_mib"] for r in ok))
    return best


def vs_trl(overrides: list[str], opts: BenchOptions, steps: int, rounds: int = 1, log=print) -> dict:
    """pptrain at its defaults (trainer.precision=auto) and in fp32 vs the TRL runs (TRL_RUNS,
    bench_trl.py), `rounds` times in turn; each configuration's fastest round counts. Both
    pptrain rows get their speedup and peak-RSS ratio against every TRL row."""
    from bench_trl import pptrain_default

    ours_runs = (("pptrain", overrides), ("pptrain_fp32", [*overrides, "trainer.precision=fp32"]))
    runs: dict[str, list[dict]] = {name: [] for name, _ in ours_runs} | {name: [] for name, _, _ in TRL_RUNS}
    for r in range(max(1, rounds)):
        for name, args in ours_runs:
            log(f"bench: round {r + 1}/{max(1, rounds)}: {name} ...")
            try:  # one failing row must not lose the others
                runs[name].append(pptrain_default(args, steps))
            except RuntimeError as err:
                runs[name].append({"error": str(err)[-2000:]})
        for name, label, kwargs in TRL_RUNS:
            log(f"bench: round {r + 1}/{max(1, rounds)}: {label} ...")
            runs[name].append(_trl(overrides, opts, **kwargs))
    result = {name: _fastest(runs[name]) for name in runs}
    for name, _ in ours_runs:
        ours = result[name]
        for trl_name, _, _ in TRL_RUNS:
            trl = result[trl_name]
            if ours.get("pairs_per_s") and trl.get("pairs_per_s"):
                ours[f"speedup_vs_{trl_name}"] = ours["pairs_per_s"] / trl["pairs_per_s"]
                ours[f"rss_vs_{trl_name}"] = ours["peak_rss_mib"] / trl["peak_rss_mib"]
    return {"overrides": overrides, "torch": torch.__version__, "rounds": max(1, rounds), **result}


def _merge_overrides(defaults: list[str], user: list[str]) -> list[str]:
    """Defaults first, dropping any key the user sets (Hydra rejects a key given twice)."""
    keys = {u.split("=", 1)[0].lstrip("+~") for u in user}
    return [d for d in defaults if d.split("=", 1)[0] not in keys] + list(user)


def parse_args(argv: list[str] | None = None):
    import argparse

    ap = argparse.ArgumentParser(prog="scripts/bench.py", description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="config overrides as for pptrain, e.g. dataset.num_rows=64")
    ap.add_argument("--out", default="outputs/bench", help="output folder (bench.json, bench.md, bench.png)")
    ap.add_argument("--grid", default=None, help="comma list of layout:packer[:backend], e.g. paired:none:sdpa,shared:ffd:flex "
                    "(backend: model.attention of that point; default: the overrides' model.attention)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up optimizer steps")
    ap.add_argument("--units-per-step", type=int, default=16, help="prompts per optimizer step")
    ap.add_argument("--num-units", type=int, default=None, help="cap on the prompts in the timed pass")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per point (the fastest counts)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per point (default: torch's)")
    ap.add_argument("--big", action="store_true", help="a ~50M-parameter Llama (hidden 512, 8 layers), fewer rows; with --vlm: that language model in the tiny VLM")
    ap.add_argument("--vlm", action="store_true",
                    help="vision-language data: recipe tiny_vlm_dpo (tiny LLaVA-style model, bundled photographs); "
                         "adds tokens per step and vision-encoder images and calls; no TRL baseline")
    ap.add_argument("--in-process", action="store_true", help="no subprocess per point (peak memory then shared)")
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL baseline even when trl is installed")
    ap.add_argument("--vs-trl", action="store_true",
                    help="instead of the grid: the real pptrain (defaults, fp32) vs TRL's DPOTrainer (defaults, fp32, "
                         "fp32 with precompute_ref_log_probs, bf16 with precompute_ref_log_probs)")
    ap.add_argument("--steps", type=int, default=8, help="--vs-trl: pptrain optimizer steps (the first is warm-up)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="--vs-trl: run every configuration this many times in turn; the fastest round counts")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """`python scripts/bench.py [--big] [overrides...]`: run the grid, write JSON, Markdown, PNG."""
    args = parse_args(argv)
    if args.vlm:  # --big: the same language model inside the VLM
        defaults = ["recipe=tiny_vlm_dpo"]
        defaults += [o.replace("model.from_config.", "model.from_config.text_config.") for o in BIG_MODEL] if args.big else []
    else:
        defaults = ["model=tiny", "dataset.num_rows=48" if args.big else "dataset.num_rows=160"]
        defaults += BIG_MODEL if args.big else []
    overrides = _merge_overrides(defaults, args.overrides)
    grid = [tuple(item.split(":")) for item in args.grid.split(",")] if args.grid else list(GRID)
    opts = BenchOptions(grid=grid, warmup_steps=args.warmup, units_per_step=args.units_per_step,
                        num_units=args.num_units, repeats=args.repeats, threads=args.threads,
                        subprocess=not args.in_process,
                        trl=not (args.no_trl or args.vlm))
    start = time.perf_counter()
    from bench_report import write_outputs, write_vs_trl

    if args.vs_trl:
        result = vs_trl(overrides, opts, args.steps, args.rounds)
        result["wall_s"] = time.perf_counter() - start
        paths = write_vs_trl(result, Path(args.out))
        print(Path(paths["markdown"]).read_text())
        return result
    result = run_grid(overrides, opts)
    result["wall_s"] = time.perf_counter() - start
    paths = write_outputs(result, Path(args.out))
    print(Path(paths["markdown"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return result


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
