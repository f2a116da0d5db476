"""Mixed precision (ppo_train/precision.py): what `auto` resolves to, what each ZeRO stage runs
in, that bf16 mixed loses no update in gradient accumulation or in the master weights, that
the head's bf16 matmuls over fp32 weights give fp32 gradients, and that fp16 is refused."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ppo_train import precision
from ppo_train.cli import compose
from ppo_train.config_check import validate
from ppo_train.errors import ConfigError
from ppo_train.precision import Numerics
from tests.conftest import random_examples, tiny_model


@pytest.mark.parametrize("amx, avx512_bf16, want", [(True, False, "bf16"), (False, True, "bf16"),
                                                     (True, True, "bf16"), (False, False, "fp32")])
def test_auto_on_the_cpu_is_bf16_exactly_where_it_has_bf16_units(monkeypatch, amx, avx512_bf16, want):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert precision.resolve("auto", torch.device("cpu")) == want
    # every rank must have them: one rank without makes every rank fp32
    assert precision.resolve("auto", torch.device("cpu"), everywhere=lambda ok: False) == "fp32"
    for explicit in ("fp32", "bf16"):  # explicit values are kept whatever the hardware
        assert precision.resolve(explicit, torch.device("cpu")) == explicit


@pytest.mark.parametrize("capability, want", [((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"), ((8, 6), "bf16"),
                                              ((9, 0), "bf16"), ((12, 0), "bf16")])
def test_auto_on_cuda_is_bf16_from_compute_capability_8(monkeypatch, capability, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert precision.resolve("auto", torch.device("cuda", 0)) == want


def test_the_default_is_auto_on_every_device():
    for trainer in ("cpu", "gpu"):
        assert str(compose([f"trainer={trainer}"]).trainer.precision) == "auto"


def test_the_stages_dtypes():
    """Stage 0: fp32 parameters under autocast, DeepSpeed in fp32; stages 1-3: DeepSpeed's bf16
    with fp32 accumulation and fp32 reduction; fp32: nothing of either."""
    zero = Numerics("bf16", 0)
    assert (zero.autocast, zero.param_dtype, zero.compute_dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
    assert zero.deepspeed() == {"bf16": {"enabled": False}, "fp16": {"enabled": False}}
    for stage in (1, 2, 3):
        n = Numerics("bf16", stage)
        assert (n.autocast, n.param_dtype, n.compute_dtype) == (None, torch.bfloat16, torch.bfloat16)
        assert n.deepspeed() == {"bf16": {"enabled": True}, "fp16": {"enabled": False},
                                 "data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
    for stage in range(4):
        n = Numerics("fp32", stage)
        assert (n.autocast, n.param_dtype, n.compute_dtype) == (None, torch.float32, torch.float32)
        assert n.deepspeed() == {"bf16": {"enabled": False}, "fp16": {"enabled": False}}
    with pytest.raises(ValueError, match="resolve it first"):
        Numerics("auto", 0)


def test_fp16_is_refused_at_config_time_in_one_line():
    with pytest.raises(ConfigError) as err:
        validate(compose(["trainer.precision=fp16"]))
    message = str(err.value)
    assert "trainer.precision=fp16" in message and "loss scale" in message and "\n" not in precision.FP16_REFUSED


# --- the engine: gradient accumulation and master weights in bf16 mixed precision, per stage ---

def _engine(stage: int, prec: str, accum: int, lr: float = 5e-7):
    from ppo_train.dist import init_distributed
    from ppo_train.engine import Engine
    from ppo_train.scoring import PolicyModule

    cfg = compose([f"trainer.zero_stage={stage}", f"trainer.grad_accum={accum}", f"trainer.precision={prec}",
                   f"trainer.lr={lr}", "trainer.warmup_ratio=0", "trainer.schedule=constant"])
    numerics = Numerics.of(cfg.trainer, 1)
    model = tiny_model("llama", vocab=97).to(numerics.param_dtype).train()
    return Engine(PolicyModule(model, 16, autocast=numerics.autocast), cfg.trainer, 100, init_distributed("cpu"))


def _micro_batches():
    from ppo_train.data.layout import build_units
    from ppo_train.data.packing import plan_epoch
    from ppo_train.scoring import Scorer

    units = build_units(random_examples(12, 2, seed=1), "shared")
    packing = OmegaConf.create({"name": "ffd", "row_tokens": 256, "rows_per_batch": 1, "pad_multiple": 64})
    return Scorer(units, 0), plan_epoch(units, packing, 6, seed=1, epoch=0)


def _full(engine, stage: int, what: str) -> list[torch.Tensor | None]:
    """Every parameter's accumulated gradient ("grad") or fp32 master weight ("master"), whole."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    out = []
    for p in engine.module.parameters():
        if stage == 0:
            value = p.grad if what == "grad" else p
        else:
            value = safe_get_full_grad(p) if what == "grad" else safe_get_full_fp32_param(p)
        out.append(None if value is None else value.detach().double().clone())
    return out


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_mixed_accumulates_gradients_in_fp32(stage):
    """The same micro-batch K = 5 times: the accumulated gradient is K times the first one to
    fp32 rounding. Accumulated in bf16 (DeepSpeed's bf16 without data_types.grad_accum_dtype, at
    any stage) it is off by up to 3.5e-3 of the largest entry; here: 0 at stages 1-3 (bf16
    gradients times 5 are exact in fp32) and about 5e-8 at stage 0 (fp32 gradients)."""
    k = 5
    engine = _engine(stage, "bf16", k)
    scorer, mbs = _micro_batches()
    first = None
    for i in range(k):
        engine.backward(-scorer(engine, mbs[0]).scores.sums.sum() / 100)
        if i == 0:
            first = _full(engine, stage, "grad")
            assert {g.dtype for g in first if g is not None} == {torch.float64}  # (read as float64)
        if i < k - 1:
            engine.step()
    total = _full(engine, stage, "grad")
    worst = max(float((b - k * a).abs().max() / (k * a).abs().max().clamp(min=1e-30))
                for a, b in zip(first, total) if a is not None)
    assert worst <= 2e-7, f"stage {stage}: accumulated gradient off by {worst:.3g} of its largest entry"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_mixed_master_weights_move_as_fp32_ones_at_lr_5e_7(stage):
    """4 optimizer steps of 2 micro-batches at lr 5e-7, far below a bf16 weight's rounding step
    (about 1.2e-4 at 0.02): the fp32 master weights of a bf16 mixed run move as an fp32 run's.
    Tolerances (measured on the CPU: relative L2 0.028-0.030, mean |update| ratio 0.9997-1.00002,
    1-6 of 24,760 moved weights unmoved): the update vector within 10% (L2) of fp32's, its mean
    size within 2%, and at most 0.1% of the weights that move in fp32 left unmoved. A bf16
    master (or compute copy updated in place) would leave nearly every weight unmoved."""
    scorer, mbs = _micro_batches()

    def updates(prec: str, st: int) -> list[torch.Tensor]:
        engine = _engine(st, prec, 2)
        before = _full(engine, st, "master")
        for i in range(8):
            engine.backward(-scorer(engine, mbs[i % len(mbs)]).scores.sums.sum() / 100)
            engine.step()
        return [a - b for a, b in zip(_full(engine, st, "master"), before)]

    fp32, mixed = updates("fp32", 0), updates("bf16", stage)
    l2 = sum(float((m - f).pow(2).sum()) for m, f in zip(mixed, fp32)) ** 0.5 / sum(
        float(f.pow(2).sum()) for f in fp32) ** 0.5
    size = sum(float(m.abs().sum()) for m in mixed) / sum(float(f.abs().sum()) for f in fp32)
    moved = sum(int((f != 0).sum()) for f in fp32)
    lost = sum(int(((m == 0) & (f != 0)).sum()) for m, f in zip(mixed, fp32))
    assert moved > 20000, moved
    assert l2 <= 0.10 and abs(size - 1) <= 0.02 and lost <= 1e-3 * moved, (stage, l2, size, lost, moved)


# --- the head: bf16 matmuls over fp32 weights ---

def test_fused_head_in_bf16_over_fp32_weights_matches_autocast_and_returns_fp32_grads():
    """LinearLogProbs with dtype=bf16 against torch's own: F.linear under autocast, fp32
    log-softmax. Values and both gradients within bf16 tolerance; the gradients in the inputs'
    fp32; and the fp32 path itself is untouched (dtype=None equals fp32 autograd to 1e-5)."""
    from ppo_train.logps import LinearLogProbs

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen)
    weight = (0.3 * torch.randn(50, 16, generator=gen)).requires_grad_()
    targets = torch.randint(0, 50, (37,), generator=gen)
    upstream = torch.randn(37, generator=gen)

    def plain(h, w, low):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            logits = torch.nn.functional.linear(h, w)
        return logits.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)

    for low, tol in ((True, 3e-2), (False, 1e-5)):
        for recompute in (True, False):
            h1, w1 = hidden.clone().requires_grad_(), weight.detach().clone().requires_grad_()
            h2, w2 = hidden.clone().requires_grad_(), weight.detach().clone().requires_grad_()
            got = LinearLogProbs.apply(h1, w1, targets, 8, recompute, torch.bfloat16 if low else None)
            want = plain(h2, w2, low)
            (got * upstream).sum().backward()
            (want * upstream).sum().backward()
            assert got.dtype == torch.float32 and h1.grad.dtype == w1.grad.dtype == torch.float32
            for a, b in ((got, want), (h1.grad, h2.grad), (w1.grad, w2.grad)):
                scale = float(b.detach().abs().max())
                assert float((a - b).abs().max()) <= tol * max(1.0, scale), (low, recompute, a, b)

