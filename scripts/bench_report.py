"""The benchmark's outputs: bench.json, a Markdown table with the setting and caveats, and a
plot of achieved against ideal speedups (see scripts/bench.py for the method)."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown(result: dict) -> str:
    """The results as a Markdown table, with the setting and the caveats above it."""
    pts, st = result["points"], result["stats"]
    head = pts[0] if pts else {}
    lines = [f"# pptrain benchmark ({head.get('device', '?')}, {head.get('params', 0) / 1e6:.1f}M parameters, "
             f"{head.get('threads', '?')} threads, torch {result['torch']})", "",
             f"- overrides: `{' '.join(result['overrides'])}`",
             f"- {head.get('units', 0)} prompts per timed pass (fastest of {result['options']['repeats']}), "
             f"{result['options']['units_per_step']} per optimizer step, {result['options']['warmup_steps']} warm-up "
             "step(s); same examples and initial weights everywhere",
             f"- data: prompt median {st['prompt_tokens']['median']:.0f} tokens, response median "
             f"{st['response_tokens']['median']:.0f}; ideal prefix-sharing speedup {st['ideal_speedup']:.3f}x",
             f"- speedup = samples/s over paired+none; ideal (padded) = padded tokens of paired+none / padded "
             f"tokens of the point; peak memory: {head.get('peak_memory_scope', '?')}", ""]
    vision = any(p.get("images") for p in pts)
    if vision:
        lines[-1:-1] = [f"- images: {st['images']} in the data, {st['image_tokens']} image tokens (median "
                        f"{st['image_tokens_per_prompt']['median']:.0f} per prompt); encoder images = images sent "
                        "through the vision encoder in the timed pass, encoder calls = its forward calls; MFU counts "
                        "the language model only"]
    cols = ["config", "samples/s", "real tok/s", "MFU", "pad %", "peak MiB", "mask ms/step", "steps", "speedup",
            "ideal (padded)", "ideal (prefix)", "achieved/ideal", "new graphs"]
    if vision:
        cols[1:1] = ["tokens/step", "encoder images", "encoder calls"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for p in pts:
        cells = [f"{p['layout']}+{p['packer']}", _fmt(p["samples_per_s"]), _fmt(p["real_tokens_per_s"], ".0f"),
                 _fmt(p.get("mfu"), ".1%"),
                 _fmt(100 * p["pad_fraction"], ".1f"), _fmt(p["peak_memory_mib"], ".0f"),
                 _fmt(1000 * p["mask_s_per_step"], ".1f"), str(p["steps"]), _fmt(p["speedup"], ".2f", "x"),
                 _fmt(p["ideal_padded"], ".2f", "x"), _fmt(p["ideal_prefix"], ".2f", "x"),
                 _fmt(p.get("efficiency"), ".0%"), str(p["compiled_graphs_after_warmup"])]
        if vision:
            cells[1:1] = [_fmt(p["tokens_per_step"], ".0f"), str(p["images"]), str(p["encoder_calls"])]
        lines.append("| " + " | ".join(cells) + " |")
    trl = result["trl"]
    lines += ["", f"TRL DPOTrainer baseline: {trl.get('skipped') or trl.get('error') or _fmt(trl.get('pairs_per_s'))}"
              + ("" if trl.get("skipped") or trl.get("error") else " pairs/s")]
    busy = [p for p in pts if (p.get("other_cpu_share") or 0) > 0.05]
    if busy:
        lines.append("WARNING: other processes used the CPU during " + ", ".join(
            f"{p['layout']}+{p['packer']} ({p['other_cpu_share']:.0%})" for p in busy) + "; rerun on a quiet machine")
    if "wall_s" in result:
        lines.append(f"Benchmark wall time: {result['wall_s']:.0f} s")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path | None:
    """Achieved vs ideal (padded-token) speedup per configuration; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pts = [p for p in result["points"] if p["speedup"] is not None]
    x = range(len(pts))
    fig, ax = plt.subplots(figsize=(1.3 * len(pts) + 2, 4))
    ax.bar([i - 0.2 for i in x], [p["speedup"] for p in pts], 0.4, label="achieved (samples/s)")
    ax.bar([i + 0.2 for i in x], [p["ideal_padded"] for p in pts], 0.4, label="ideal (padded tokens)")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(list(x), [f"{p['layout']}\n{p['packer']}" for p in pts])
    ax.set_ylabel("speedup over paired+none")
    ax.set_title(f"pptrain: achieved vs ideal speedup ({pts[0]['device'] if pts else ''})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(result: dict, out_dir: Path) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["markdown"].write_text(markdown(result))
    png = plot(result, out_dir / "bench.png")
    if png is not None:
        paths["plot"] = png
    return {k: str(v) for k, v in paths.items()}


def write_vs_trl(result: dict, out_dir: Path) -> dict[str, str]:
    """vs_trl.json and vs_trl.md: pairs/s, MFU and peak RSS of pptrain (defaults, fp32) and of
    the TRL runs, with pptrain's speedup and RSS ratio against each TRL run."""
    from bench import TRL_RUNS

    out_dir.mkdir(parents=True, exist_ok=True)
    rounds = result.get("rounds", 1)
    ours = [(name, label) for name, label in (("pptrain", "pptrain defaults"), ("pptrain_fp32", "pptrain fp32"))
            if name in result]
    lines = [f"# pptrain vs TRL DPOTrainer (torch {result['torch']})", "",
             f"- overrides: `{' '.join(result['overrides'])}`",
             f"- rounds: {rounds} (each configuration's fastest; every round's pairs/s in vs_trl.json)",
             "- MFU: against the peak of the precision each run computes in", "",
             "| run | precision | pairs/s | MFU | peak RSS MiB | " + " | ".join(
                 f"{label}: speedup, RSS ratio vs this" for _, label in ours) + " |",
             "|---|---|---|---|---|" + "---|" * len(ours)]

    def row(label: str, run: dict, precision: str, versus: str | None) -> str:
        if run.get("pairs_per_s") is None:
            return f"| {label} | {precision} | {str(run.get('skipped') or run.get('error', '?'))[:200]} | | |" + " |" * len(ours)
        cells = [f"{_fmt(result[name].get('speedup_vs_' + versus), '.2f', 'x')}, "
                 f"{_fmt(result[name].get('rss_vs_' + versus), '.2f', 'x')}" if versus else "" for name, _ in ours]
        return (f"| {label} | {precision} | {_fmt(run['pairs_per_s'])} | {_fmt(run.get('mfu'), '.1%')} | "
                f"{_fmt(run.get('peak_rss_mib'), '.0f')} | " + " | ".join(cells) + " |")

    for name, label in ours:
        lines.append(row(label, result[name], result[name].get("precision", "fp32" if name.endswith("fp32") else "?"),
                         None))
    for name, label, kwargs in TRL_RUNS:
        lines.append(row(label, result.get(name, {"skipped": "not run"}), "bf16 mixed" if kwargs["bf16"] else "fp32",
                         name))
    if "wall_s" in result:
        lines.append(f"\nBenchmark wall time: {result['wall_s']:.0f} s")
    paths = {"json": out_dir / "vs_trl.json", "markdown": out_dir / "vs_trl.md"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["markdown"].write_text("\n".join(lines) + "\n")
    return {k: str(v) for k, v in paths.items()}
