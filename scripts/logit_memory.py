"""Microbenchmark of the log-prob head: chunked (`ppo_train.logps.token_logps`) vs naive.

    naive:   head(h).float().log_softmax(-1).gather(-1, targets)   holds (T, V) fp32 logits,
             their log-softmax and, in the backward, (T, V) gradients at once
    chunked: token_logps(h, positions, targets, head, chunk)      one (chunk, V) block at a
             time, recomputed in the backward (activation checkpointing)

Default size: T = 8192 response tokens, V = 128000 (Llama-3's vocabulary), hidden 256 (small
to keep the CPU matmuls short; the logits are (T, V) whatever the hidden size), fp32, chunk
1024. Each variant runs forward + backward of a weighted sum of the log-probs in its own
subprocess. Peak memory: on CUDA `max_memory_allocated` above what the inputs hold; on the
CPU the process's peak RSS (VmHWM, reset through /proc/self/clear_refs just before the
computation) minus its RSS there. Values and gradients (hidden and head weight) of the two
variants are compared (max abs difference).

    python scripts/logit_memory.py [--tokens 8192] [--vocab 128000] [--hidden 256] [--chunk 1024]

Writes outputs/bench/logit_memory.json and prints a table. Needs ~13 GB of free memory at
the default size (the naive variant).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import probe


def make_inputs(tokens: int, vocab: int, hidden: int, seed: int, device: str = "cpu"):
    """hidden (1, T, H) and head weight (V, H) leaves with grad, targets (T,), loss weights (T,)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(1, tokens, hidden, generator=gen).to(device).requires_grad_()
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=gen) / hidden**0.5)
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    weights = torch.rand(tokens, generator=gen, dtype=torch.float64).to(device)  # non-uniform gradients
    return h, head.to(device), targets, weights


def naive_logps(h: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """(1, T, H) -> (T,) log-probs through full (T, V) logits."""
    logits = head(h[0]).float()
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def chunked_logps(h: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    from ppo_train.logps import token_logps

    positions = torch.arange(h.shape[1], device=h.device)
    return token_logps(h, positions, targets, head, chunk)


def run_variant(variant: str, h, head, targets, weights, chunk: int):
    """Forward + backward; (values (T,), grad of hidden (1, T, H), grad of head weight (V, H))."""
    values = naive_logps(h, head, targets) if variant == "naive" else chunked_logps(h, head, targets, chunk)
    (values.double() * weights).sum().backward()
    return values.detach(), h.grad, head.weight.grad


def compare_heads(tokens: int, vocab: int, hidden: int, chunk: int, seed: int = 0) -> dict[str, float]:
    """Both variants in this process on the same inputs; max abs differences (for the tests)."""
    out = {}
    for variant in ("naive", "chunked"):
        out[variant] = run_variant(variant, *make_inputs(tokens, vocab, hidden, seed), chunk)
    names = ("values", "grad_hidden", "grad_head")
    return {n: float((a - b).abs().max()) for n, a, b in zip(names, out["naive"], out["chunked"])}


def measure(variant: str, args) -> dict:
    """One variant in this (fresh) process: seconds and peak memory above the inputs."""
    import ppo_train.logps  # noqa: F401 - imported before the measurement starts

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    h, head, targets, weights = make_inputs(args.tokens, args.vocab, args.hidden, args.seed, str(device))
    probe.reset_peak(device)
    base = probe.current_mib(device)
    start = probe.sync(device)
    values, grad_h, grad_w = run_variant(variant, h, head, targets, weights, args.chunk)
    seconds = probe.sync(device) - start
    peak = probe.peak_mib(device) - base
    torch.save({"values": values.cpu(), "grad_hidden": grad_h.cpu(), "grad_head": grad_w.cpu()}, args.save)
    return {"variant": variant, "device": str(device), "seconds": seconds, "peak_mib": peak,
            "memory": "cuda max allocated above inputs" if device.type == "cuda" else "peak RSS above inputs"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=128000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/bench/logit_memory.json")
    ap.add_argument("--variant", choices=("naive", "chunked"), help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--save", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.variant:  # worker: one variant, results to files
        Path(args.report).write_text(json.dumps(measure(args.variant, args)))
        return {}
    rows, tensors = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("naive", "chunked"):
            save, report = Path(tmp) / f"{variant}.pt", Path(tmp) / f"{variant}.json"
            cmd = [sys.executable, __file__, "--variant", variant, "--save", str(save), "--report", str(report),
                   *(f"--{k}={getattr(args, k)}" for k in ("tokens", "vocab", "hidden", "chunk", "seed"))]
            subprocess.run(cmd, check=True)
            rows.append(json.loads(report.read_text()))
            tensors[variant] = torch.load(save)
    diffs = {k: float((tensors["naive"][k] - tensors["chunked"][k]).abs().max()) for k in tensors["naive"]}
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    result = {"tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden, "chunk": args.chunk,
              "fp32_logits_mib": logits_mib, "variants": rows, "max_abs_diff": diffs,
              "memory_ratio": rows[0]["peak_mib"] / max(rows[1]["peak_mib"], 1e-9)}
    print(f"log-prob head, T={args.tokens} V={args.vocab} H={args.hidden} fp32, chunk {args.chunk}; "
          f"one (T, V) fp32 logits tensor = {logits_mib:.0f} MiB")
    print(f"{'variant':<10}{'seconds':>10}{'peak MiB':>12}")
    for r in rows:
        print(f"{r['variant']:<10}{r['seconds']:>10.2f}{r['peak_mib']:>12.0f}")
    print(f"peak memory naive / chunked: {result['memory_ratio']:.1f}x ({rows[0]['memory']})")
    print("max abs diff: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
