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

The peak is measured at start-up (`calibrate_peak`): the best of a few large GEMMs in the
training dtype on the training device, with this process's threads. On the CPU that is the
honest ceiling of what PyTorch's kernels reach here (no vendor sheet applies to a shared VM);
on CUDA it is typically 70-90% of the datasheet's dense number, so MFU reads higher than against
the datasheet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Utilization:
    """What turns a step's batches and seconds into `flops_per_s` and `mfu` (metrics rows)."""

    counter: FlopCounter
    peak: float  # FLOP/s of one device (calibrated)

    @classmethod
    def measure(cls, model: torch.nn.Module, reward: bool, live_reference: bool, device: torch.device,
                dtype: torch.dtype) -> "Utilization":
        return cls(FlopCounter(ModelShape.of(model, reward), 4.0 if live_reference else 3.0),
                   calibrate_peak(device, dtype))

    def row(self, flops: float, seconds: float, world_size: int) -> dict[str, float]:
        per_s = flops / max(seconds, 1e-9)
        return {"flops_per_s": per_s, "mfu": per_s / (self.peak * world_size), "peak_flops_per_s": self.peak}
