"""Model FLOPs of the work a step needs, and the device's peak, for utilization (MFU).

Counted as the work the model needs, not what the kernels did: no padding, no recomputation
(the chunked head and gradient checkpointing recompute; that is hardware FLOPs, not model FLOPs):

- body: 2 x (elements of the decoder's 2-D weights, embeddings excluded) per real token;
- output head: 2 x hidden x vocab per scored (response) token; a reward head 2 x hidden per
  response;
- attention: per layer 4 x heads x head_dim per visible (query, key) pair (QK^T and AV): causal
  within a document, and in the shared layout a response sees the prompt and itself only
  (layout=unmasked: causal over the whole row, as its mask is);
- a training forward counts 3x (the backward costs two forwards); a live reference adds one
  forward of the same size.

The peak is that of the precision in use (the dtype matmuls run in: bf16 under bf16 mixed
precision, fp32 or TF32 under fp32; ppo_train/precision.py), per device (`peak_flops`):

- a GPU in the spec-sheet table (dense tensor-core numbers, no sparsity): that number;
- else a calibration (`calibrate_peak`): the best of large GEMMs in that dtype on the device
  with this process's threads, raised to the best this machine has recorded for the same
  device, dtype and thread count (`<cache>/pptrain/peak_flops.json`; XDG_CACHE_HOME, else
  ~/.cache). A calibration that ran while other work loaded the machine measures a low peak,
  which would make MFU read high; the record keeps the unloaded one.

A step whose model FLOP/s exceed the peak proves the peak wrong: `mfu` is null from then on for
the run (the FLOP/s stay), and rank 0 says why on stderr, once. MFU is never above 1.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class ModelShape:
    body_elements: int  # elements of the decoder's 2-D weights, embeddings excluded
    hidden: int
    vocab: int
    layers: int
    attention_width: int  # heads x head_dim (queries)
    reward: bool = False

    @classmethod
    def of(cls, model: torch.nn.Module, reward: bool = False) -> "ModelShape":
        """From a transformers model (ZeRO-3 placeholders counted at their full size). Of a
        vision-language model, the language model only: its vision encoder is not counted."""
        from ppo_train.vision import vision_tower

        config = model.config.get_text_config()
        body = getattr(model, model.base_model_prefix)
        tower = vision_tower(model)
        skip = {id(model.get_input_embeddings().weight)} | {id(p) for p in (tower.parameters() if tower else ())}
        # under ZeRO-3 a parameter is an empty placeholder: its real shape is ds_shape
        elements = sum(getattr(p, "ds_numel", p.numel()) for p in body.parameters()
                       if len(getattr(p, "ds_shape", p.shape)) == 2 and id(p) not in skip)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(elements, config.hidden_size, config.vocab_size, config.num_hidden_layers, heads * head_dim, reward)

    def forward_flops(self, real_tokens: int, visible_pairs: int, scored_tokens: int, responses: int) -> float:
        head = 2 * self.hidden * (responses if self.reward else scored_tokens * self.vocab)
        return (2.0 * self.body_elements * real_tokens + 4.0 * self.layers * self.attention_width * visible_pairs
                + head)


@dataclass(frozen=True)
class FlopCounter:
    shape: ModelShape
    passes: float = 3.0  # forward + backward of the policy (+1 with a live reference)

    def of_batch(self, batch) -> float:
        return self.passes * self.shape.forward_flops(batch.real_tokens, batch.visible_pairs,
                                                      int(batch.target_ids.numel()), batch.num_responses)


def calibrate_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.6) -> float:
    """FLOP/s of the best of a few square GEMMs (n = 2048 on the CPU, 8192 on CUDA)."""
    n = 8192 if device.type == "cuda" else 2048
    gen = torch.Generator().manual_seed(0)  # not the global stream: training's randomness stays as it was
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    best, spent = 0.0, 0.0
    torch.mm(a, b)  # warm-up
    while spent < seconds or best == 0.0:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        took = time.perf_counter() - start
        spent += took
        best = max(best, 2.0 * n**3 / took)
    return best


# Dense peak TFLOP/s from NVIDIA's spec sheets (half of the "with sparsity" figures): (name
# fragment, bf16, tf32, fp32). The first fragment found in torch.cuda.get_device_name wins (more
# specific names first); a None row (no published figure) means calibrate.
GPU_PEAKS = (("H100 PCIe", 756.0, 378.0, 51.2), ("H100 NVL", 835.5, 417.5, 60.0), ("H100", 989.4, 494.7, 66.9),
             ("H200", 989.4, 494.7, 66.9), ("H20", 148.0, 74.0, 44.0), ("A100", 312.0, 156.0, 19.5),
             ("A800", 312.0, 156.0, 19.5), ("L40S", 362.05, 183.0, 91.6), ("L40", 181.05, 90.5, 90.5),
             ("L4", 121.0, 60.0, 30.3), ("A10G", None, None, None), ("A10", 125.0, 62.5, 31.2))


def table_peak(name: str, dtype: torch.dtype, tf32: bool) -> float | None:
    """A GPU's spec-sheet peak for `dtype` (fp32 counts as TF32 when `tf32`), or None."""
    for fragment, bf16, tf32_peak, fp32 in GPU_PEAKS:
        if fragment in name:
            value = bf16 if dtype in (torch.bfloat16, torch.float16) else tf32_peak if tf32 else fp32
            return None if value is None else value * 1e12
    return None


def peak_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pptrain" / "peak_flops.json"


def _machine_key(device: torch.device, dtype: torch.dtype) -> str:
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else (_cpu_model() or platform.machine())
    return f"{device.type}|{what}|{dtype}|threads={torch.get_num_threads()}"


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def recorded_peak(measured: float, key: str, path: Path | None = None) -> float:
    """max(measured, the best recorded under `key`), recording the new best (a cache: any failure
    to read or write it leaves `measured`)."""
    path = path or peak_cache()
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    recorded = float(known.get(key) or 0.0)
    best = max(measured, recorded)
    if best > recorded:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**known, key: best}, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError:
            pass
    return best


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s of one device in `dtype`, where it comes from): see the module docstring."""
    if device.type == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
        listed = table_peak(torch.cuda.get_device_name(device), dtype, tf32)
        if listed is not None:
            return listed, "spec sheet"
    return recorded_peak(calibrate_peak(device, dtype), _machine_key(device, dtype)), "calibrated"


@dataclass
class Utilization:
    """What turns a step's batches and seconds into `flops_per_s` and `mfu` (metrics rows)."""

    counter: FlopCounter
    peak: float  # FLOP/s of one device in the precision in use
    source: str = "calibrated"  # of the peak: "spec sheet" or "calibrated"
    announce: bool = True  # rank 0: say on stderr when the peak is proven wrong
    peak_wrong: bool = field(default=False, init=False)

    @classmethod
    def measure(cls, model: torch.nn.Module, reward: bool, live_reference: bool, device: torch.device,
                dtype: torch.dtype, announce: bool = True) -> "Utilization":
        peak, source = peak_flops(device, dtype)
        return cls(FlopCounter(ModelShape.of(model, reward), 4.0 if live_reference else 3.0), peak, source, announce)

    def row(self, flops: float, seconds: float, world_size: int) -> dict[str, float | None]:
        per_s = flops / max(seconds, 1e-9)
        mfu = per_s / (self.peak * world_size)
        if mfu > 1.0 and not self.peak_wrong:
            self.peak_wrong = True
            if self.announce:
                print(f"pptrain: warning: {per_s / world_size / 1e9:.1f} model GFLOP/s per device exceed the "
                      f"{self.source} peak of {self.peak / 1e9:.1f} GFLOP/s, so that peak is wrong (a calibration "
                      "under load measures too little); mfu is null for the rest of this run", file=sys.stderr)
        return {"flops_per_s": per_s, "mfu": None if self.peak_wrong else mfu, "peak_flops_per_s": self.peak}
