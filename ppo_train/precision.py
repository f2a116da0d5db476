"""What `trainer.precision` means on each device and ZeRO stage.

`auto` (the default) resolves once per run, before anything is built: bf16 mixed precision where
every rank's device has bf16 matrix units (CUDA compute capability 8.0 or higher; a CPU with AMX
or AVX512-BF16), fp32 elsewhere. The resolved value replaces `auto` in the run's config, so the
config.yaml, the metrics' first row (`precision`), the checkpoint's job identity and the
reference cache's fingerprint all name what ran; a run started as bf16 on one machine is
refused, naming trainer.precision, when resumed where auto means fp32.

bf16 mixed precision means, at every ZeRO stage: fp32 master weights and fp32 optimizer state,
bf16 matrix multiplications, fp32 gradient accumulation across micro-batches, and the output
head's log-softmax and the losses in fp32 (logps.py). How each stage gets there:

    stage 0   (one process: the `auto` stage)  the model's parameters stay fp32 and are the
              master weights; the forward runs under torch.autocast(bf16) (matmuls and attention
              in bf16, norms and the residual stream in fp32; the output head's matmuls in bf16,
              its softmax in fp32). Gradients are fp32 by construction and accumulate in fp32
              `.grad`. DeepSpeed runs in fp32 mode. (DeepSpeed's own bf16 at stage 0 would
              accumulate in bf16 and refuses fp32 accumulation there.)
    stage 1-3 DeepSpeed's bf16 mode: bf16 parameters (the compute copy, gathered in bf16 under
              ZeRO-3), fp32 master partitions in its optimizer, and
              `data_types.grad_accum_dtype=fp32` (each micro-batch's bf16 gradient is added into
              fp32 buffers); gradients are reduced across ranks in fp32
              (`communication_data_type`). The master starts from the bf16 parameters.
              Autocast over fp32 parameters is not used there: under ZeRO-3 its bf16 weight
              copies, saved for the backward, would keep a whole bf16 model on every rank.

fp16 is refused at config time: DeepSpeed's fp16 at stage 0 (with pptrain's AdamW) divides the
gradients by the loss scale without having scaled the loss, so updates come out 65536x too small,
and no fp16 path is tested here; bf16 (auto) trains where fp16 would, and GPUs without bf16 run
fp32.

Exact comparisons (golden runs, equivalence, resume and rank tests) pin trainer.precision=fp32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

AUTO, FP32, BF16, FP16 = "auto", "fp32", "bf16", "fp16"
FP16_REFUSED = ("trainer.precision=fp16: not supported: DeepSpeed's fp16 at ZeRO stage 0 divides the gradients by "
                "the loss scale without scaling the loss (updates 65536x too small), and no fp16 path is tested; use "
                "trainer.precision=auto (bf16 mixed where the hardware has bf16, else fp32) or bf16 or fp32")


def cpu_has_bf16_units() -> bool:
    """AMX tiles or AVX512-BF16 (what oneDNN's bf16 GEMMs run on), from torch's CPU probe,
    else /proc/cpuinfo's flags."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if all(p is not None for p in probes):
        return any(bool(p()) for p in probes)
    try:  # pragma: no cover - torch builds without the probes
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def has_bf16_units(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware (what `auto` picks bf16 for)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return cpu_has_bf16_units()
    return False


def resolve(precision: str, device: torch.device, everywhere=lambda ok: ok) -> str:
    """`auto` -> bf16 or fp32 (`everywhere(ok)`: True only when it holds on every rank, so that
    all ranks resolve alike); anything else unchanged."""
    if str(precision) != AUTO:
        return str(precision)
    return BF16 if everywhere(has_bf16_units(device)) else FP32


@dataclass(frozen=True)
class Numerics:
    """The dtypes of one resolved precision at one ZeRO stage."""

    precision: str  # fp32 | bf16 (resolved)
    stage: int

    def __post_init__(self):
        if self.precision not in (FP32, BF16):
            raise ValueError(f"trainer.precision={self.precision!r}: resolve it first (precision.resolve)")

    @classmethod
    def of(cls, t, world_size: int) -> "Numerics":
        """Of a trainer config. train() resolves `auto` once for all ranks before anything is
        built; a config used outside it (scripts, tests, a library caller) resolves it here for
        this process's device."""
        from ppo_train.dist import device_for
        from ppo_train.engine import zero_stage

        return cls(resolve(t.precision, device_for(str(t.device))), zero_stage(t, world_size))

    @property
    def autocast(self) -> torch.dtype | None:
        """The forward's autocast dtype (bf16 mixed at stage 0), else None."""
        return torch.bfloat16 if self.precision == BF16 and self.stage == 0 else None

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype the model is built in: bf16 where DeepSpeed's bf16 mode holds the master."""
        return torch.bfloat16 if self.precision == BF16 and self.stage > 0 else torch.float32

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype matmuls run in (the peak MFU is counted against)."""
        return torch.bfloat16 if self.precision == BF16 else torch.float32

    def deepspeed(self) -> dict:
        """The DeepSpeed config entries of this precision."""
        native = self.param_dtype == torch.bfloat16
        out: dict = {"bf16": {"enabled": native}, "fp16": {"enabled": False}}
        if native:
            out["data_types"] = {"grad_accum_dtype": "fp32"}
            out["communication_data_type"] = "fp32"
        return out


def autocast(device_type: str, dtype: torch.dtype | None):
    """torch.autocast to `dtype` on `device_type`, or nothing when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)
