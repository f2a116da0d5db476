"""The one-process fast paths change no number: DeepSpeed's gradient reduction skipped at
stage 0 with one rank, the finiteness check through the gradient norm, and glibc's malloc
keeping freed memory (checked by its effect: page faults of a re-allocated block)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch

from ppo_train.cli import compose


def _engine():
    from ppo_train.dist import init_distributed
    from ppo_train.engine import Engine

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Tanh(), torch.nn.Linear(48, 8))
    return Engine(module, compose(["trainer.zero_stage=0", "trainer.grad_accum=1"]).trainer, 10, init_distributed("cpu"))


def test_one_rank_at_stage_0_skips_the_reduction_with_the_same_gradients():
    engine = _engine()
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    params = list(engine.module.parameters())
    with mock.patch.object(engine.engine, "allreduce_gradients", wraps=engine.engine.allreduce_gradients) as spy:
        engine.backward(engine(x).square().mean())
        assert spy.call_count == 0
        ours = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        engine.engine.backward(engine(x).square().mean(), scale_wrt_gas=False)  # DeepSpeed's own path
        assert spy.call_count == 1
    assert all(torch.equal(a, p.grad) for a, p in zip(ours, params))


@pytest.mark.parametrize("entry, finite", [(float("nan"), False), (float("inf"), False), (1e15, True),
                                           (1e20, False)])
def test_the_finiteness_check_sees_any_bad_gradient_entry(entry, finite):
    """Through the gradient norm: NaN and inf entries, and an fp32 sum of squares that
    overflows (entries beyond about 1.8e19), are non-finite; a large finite entry is not."""
    engine = _engine()
    engine.backward(engine(torch.randn(4, 64)).sum())
    assert engine._grads_finite()
    list(engine.module.parameters())[2].grad[3, 5] = entry
    assert engine._grads_finite() is finite


def test_keep_freed_memory_stops_most_page_faults_of_recurring_blocks():
    """A step-like pattern (two activation-sized blocks and a result, freed together) repeated:
    glibc's default returns the blocks to the OS (mmap), so every page faults in again each
    time; with keep_freed_memory they come back from the heap. Not all of them every time:
    a freed chunk of exactly the size asked for does not fit an aligned request (posix_memalign
    asks for the size plus the alignment), so the heap sometimes grows instead (measured: 0 to
    32768 faults per cycle against 40963)."""
    script = textwrap.dedent("""
        import resource, sys, torch
        from ppo_train.hostmem import keep_freed_memory
        if sys.argv[1] == "keep":
            assert keep_freed_memory()
        def faults_of_one_cycle():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            a, b = torch.ones(16 << 20), torch.ones(8 << 20)  # 64 + 32 MiB
            c = a + 1
            del a, b, c
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        faults_of_one_cycle()
        print(sum(faults_of_one_cycle() for _ in range(12)))
    """)
    faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "keep")}
    pages = 12 * (160 << 20) // 4096  # 12 cycles of 160 MiB
    assert faults["default"] > pages * 0.9, faults  # each page of each block faulted in again
    assert faults["keep"] < faults["default"] * 0.5, faults
    assert compose([]).trainer.keep_freed_memory is True  # on in the CPU trainer defaults


def test_keep_freed_memory_changes_no_number(tmp_path):
    """Two steps of the default job with and without it (measured bit for bit equal; asserted
    to 1e-9 relative, since kernels may pick other code paths for other buffer addresses)."""
    from ppo_train.train import train

    base = ["dataset.num_rows=16", "trainer.max_steps=2", "logging.progress=false", "run_name=t",
            "trainer.save_model=false", "packing.row_tokens=1024"]
    runs = [train(compose(base + [f"trainer.keep_freed_memory={v}"]), tmp_path / v) for v in ("true", "false")]
    keys = ("loss", "rewards/margins", "logps/chosen", "logps/rejected")
    steps = [[r for r in rows if "loss" in r] for rows in runs]
    assert len(steps[0]) == len(steps[1]) == 2
    for a, b in zip(*steps):
        for key in keys:
            assert abs(a[key] - b[key]) <= 1e-9 * max(1.0, abs(b[key])), (a["step"], key, a[key], b[key])
