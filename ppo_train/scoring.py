"""Scoring one micro-batch: collate -> mask -> forward -> per-response scores.

Every pass that scores responses goes through a `Scorer`: training, evaluation, the
reference pass, the live reference, the benchmark and the scripts. It decides once, from
the layout, whether documents are masked, and builds the mask once per batch for the policy
and the reference alike.

The modules: `PolicyModule` turns a batch into per-response log-prob sums and token counts
(chunked output head at response positions only), `RewardModule` into one scalar per
response read at the response's last token. Doing the whole computation inside one module's
forward keeps DeepSpeed's ZeRO-3 parameter gathering (its hooks run around module forwards)
in charge of every weight.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.profiler import record_function

from ppo_train.data.collate import PackedBatch, collate
from ppo_train.data.layout import Units
from ppo_train.data.packing import MicroBatch, round_up
from ppo_train.dist import SINGLE, DistInfo, reduce
from ppo_train.errors import ModelLoadError
from ppo_train.logps import ResponseLogps, fusable, shared_sums, sum_per_response, token_logps
from ppo_train.masks import build_mask, doc_spans, resolve_backend
from ppo_train.precision import autocast


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body (returns hidden states) and the output projection."""
    body = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if body is None or head is None:
        raise ModelLoadError(f"{type(model).__name__}: cannot find its decoder and output head")
    return body, head


class PolicyModule(torch.nn.Module):
    """Wraps a causal LM: forward(batch tensors, mask) -> per-response log-prob sums and counts."""

    def __init__(self, model: torch.nn.Module, logits_chunk: int = 1024, dist: DistInfo = SINGLE,
                 recompute: bool = True, autocast: torch.dtype | None = None, shared_sums: bool = False,
                 wpo: bool = False):
        super().__init__()
        self.model = model
        self.logits_chunk = logits_chunk
        self.dist = dist
        self.recompute = recompute
        self.autocast = autocast  # bf16 mixed at ZeRO stage 0 (ppo_train/precision.py); None: the weights' dtype
        self.shared_sums = shared_sums  # also each pair's shared-length sums (loss.ld_alpha)
        self.wpo = wpo  # also each response's WPO sum (loss.wpo)
        self.image_params = image_params(model)

    def forward(self, input_ids, position_ids, attention_mask, pred_index, target_ids, target_response,
                num_responses: int, spans=None, pairs=None, **image_inputs):
        """-> (sums (R,), counts (R,), shared (P, 2) or None, wpo (R,) or None): see
        logps.ResponseLogps. `spans`: masks.doc_spans of the batch (or None); `pairs`: the batch's
        (P, 2) pairs (needed with shared_sums); `image_inputs`: a vision-language model's image
        tensors (pixel_values, ...)."""
        body, head = decoder_and_head(self.model)
        with record_function("pptrain.forward"), autocast(input_ids.device.type, self.autocast):
            hidden = body(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                          use_cache=False, **_span_kwargs(spans), **image_inputs).last_hidden_state
        if not image_inputs and self.image_params and self.dist.world_size > 1:
            # a batch without images leaves the image parameters without gradients on this rank
            # only; ZeRO-1/2 and plain data parallelism reduce gradients by hooks, so every rank
            # must produce the same set (zeros here)
            hidden = hidden + 0.0 * sum(p.sum() for p in self.image_params)
        # the module path (a ZeRO-3 head is gathered at each call): the same number of head calls
        # on every rank, at least one, so an empty micro-batch keeps the head in the graph too;
        # the fused head makes one call whatever the token count
        chunks = 1
        if not fusable(head):
            own = max(1, -(-pred_index.numel() // self.logits_chunk))
            chunks = int(reduce(torch.tensor([own]), self.dist, "max").item())
        with record_function("pptrain.head"):
            lps = token_logps(hidden, pred_index, target_ids, head, self.logits_chunk, chunks, self.recompute,
                              self.autocast, sq=self.wpo)
        lps, squares = lps if self.wpo else (lps, None)
        out = sum_per_response(lps, target_response, num_responses)
        shared = shared_sums(lps, target_response, out.counts, pairs) if self.shared_sums else None
        wpo = out.sums.new_zeros(num_responses).index_add(0, target_response, (lps.detach() - squares).double()) \
            if self.wpo else None
        if pred_index.numel() == 0:  # lps holds the 0-valued head term
            return out.sums + lps.sum().double(), out.counts, shared, wpo
        return out.sums, out.counts, shared, wpo


def image_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """A vision-language model's trainable parameters outside its language model (the vision
    encoder and projector: what a batch without images does not reach); [] for a text model."""
    from ppo_train.vision import vision_tower

    if vision_tower(model) is None:
        return []
    body = getattr(model, model.base_model_prefix)
    return [p for n, p in body.named_parameters() if p.requires_grad and not n.startswith("language_model.")]


class RewardModule(torch.nn.Module):
    """Wraps a one-label sequence classifier: forward -> one scalar per response, read at the
    response's *last* token (in a shared row that is not the row's last non-pad token, which
    is where transformers' own pooling would look)."""

    def __init__(self, model: torch.nn.Module, autocast: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.autocast = autocast  # the body's matmuls (bf16 mixed at stage 0); the one-output score head stays fp32
        if not isinstance(getattr(model, "score", None), torch.nn.Module):
            raise ModelLoadError(f"{type(model).__name__}: no `score` head; reward models need one "
                                 "(Llama, Qwen2 and Mistral classifiers have it)")

    def forward(self, input_ids, position_ids, attention_mask, last_index, num_responses: int, spans=None,
                **image_inputs):
        body = getattr(self.model, self.model.base_model_prefix)
        with autocast(input_ids.device.type, self.autocast):
            hidden = body(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                          use_cache=False, **_span_kwargs(spans), **image_inputs).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        # exactly one head call on every rank, empty micro-batch included (ZeRO-3 gathers per call)
        rows = last_index if last_index.numel() else last_index.new_zeros(1)
        rewards = self.model.score(flat.index_select(0, rows)).squeeze(-1).double()
        if last_index.numel() == 0:
            rewards = rewards[:0] + 0.0 * rewards.sum()
        return rewards, torch.ones_like(rewards)


def _span_kwargs(spans) -> dict:
    """What the decoder passes on to its attention function (model.segmented_sdpa_forward)."""
    return {} if spans is None else {"pptrain_spans": spans}


def forward_scores(module, batch: PackedBatch, mask) -> ResponseLogps:
    """Per-response scores of one batch: log-prob sums and token counts for a PolicyModule,
    rewards (in `sums`, counts 1) for a RewardModule. `module` may be a DeepSpeed engine.
    A dense mask on the CPU comes with the rows' document runs, so that attention runs per
    document (model.segmented_sdpa_forward); on a GPU one SDPA call per row is faster."""
    inner = getattr(module, "module", module)
    _check_attention(inner, mask)
    dense = isinstance(mask, torch.Tensor) and mask.device.type == "cpu"
    spans = doc_spans(batch.doc_ids) if dense else None
    if isinstance(inner, RewardModule):
        sums, counts = module(batch.input_ids, batch.position_ids, mask, batch.last_index, batch.num_responses,
                              spans=spans, **batch.image_inputs)
        return ResponseLogps(sums, counts)
    return ResponseLogps(*module(batch.input_ids, batch.position_ids, mask, batch.pred_index, batch.target_ids,
                                 batch.target_response, batch.num_responses, spans=spans, pairs=batch.pairs,
                                 **batch.image_inputs))


def _check_attention(inner: torch.nn.Module, mask) -> None:
    """The mask must be the kind the model's attention function takes: a BlockMask for flex, a
    dense tensor for SDPA. A model built for one device's backend and a Scorer resolved for
    another's would otherwise fail deep inside attention (SDPA: "attn_mask must be Tensor, not
    BlockMask") or, worse, run."""
    model = getattr(inner, "model", None)
    config = getattr(model, "config", None)
    if config is None or mask is None:
        return
    impl = config.get_text_config()._attn_implementation
    flex_model = impl in ("pptrain_flex", "flex_attention")
    if flex_model != (not isinstance(mask, torch.Tensor)):
        kind = "a dense (SDPA) mask" if isinstance(mask, torch.Tensor) else "a FlexAttention BlockMask"
        raise ModelLoadError(f"the model's attention is {impl!r} but the batch carries {kind}: the model and the "
                             "Scorer were set up for different backends (resolve model.attention for one device "
                             "and use it for both)")


@dataclass
class Scored:
    batch: PackedBatch
    mask: Any  # a BlockMask (flex) or a (B, 1, L, L) bool tensor (sdpa)
    scores: ResponseLogps


def static_shapes(groups: list[Units], packing, micro_batch_size: int) -> tuple[int, tuple[int, ...]]:
    """(rows per micro-batch, allowed row lengths) that every micro-batch of any epoch fits.

    Compiled FlexAttention specializes on the batch shape (dynamic=False); after 8 shapes
    dynamo stops compiling that function and falls back to the unfused path, which
    materializes (B, H, L, L) scores. So under flex every micro-batch is padded to the same
    number of rows and to one of at most three row lengths: ffd rows are `row_tokens` long;
    none/sorted rows take the smallest of Lmax/4, Lmax/2 and Lmax (Lmax: the longest document,
    rounded up to pad_multiple) that holds them. `groups`: every set of units the scorer's
    copies will see (training, evaluation). With the training and the no-grad passes
    compiled separately, a run compiles at most 2 (ffd) or 6 (none/sorted) graphs.
    """
    if packing.name == "ffd":
        return packing.rows_per_batch, (packing.row_tokens,)
    longest = round_up(max([int(g.doc_lengths.max(initial=1)) for g in groups] or [1]), packing.pad_multiple)
    per_unit = max([int(g.docs_per_unit.max(initial=1)) for g in groups] or [1])
    lengths = sorted({round_up(-(-longest // d), packing.pad_multiple) for d in (4, 2, 1)})
    return micro_batch_size * per_unit, tuple(lengths)


@dataclass(frozen=True)
class Scorer:
    """Collate, mask and forward for the micro-batches of one list of units."""

    units: Units
    pad_id: int
    backend: str = "sdpa"  # 'flex' or 'sdpa'
    device: torch.device = torch.device("cpu")
    pad_multiple: int = 128  # the row length of an empty micro-batch
    mask_documents: bool = True  # False only for layout=unmasked
    restart_positions: bool = True
    rows: int = 1  # at least this many rows per micro-batch (static shapes: see static_shapes)
    lengths: tuple[int, ...] = ()  # allowed row lengths (empty: each micro-batch's own)
    images: Any = None  # vision.ImageInputs of a vision-language model (units with images)

    @classmethod
    def from_config(cls, cfg, units: Units, pad_id: int, device: torch.device,
                    all_units: list[Units] | None = None, images=None) -> "Scorer":
        """`all_units`: every unit this scorer's copies will see (training and evaluation), so
        that both passes share one set of shapes under flex. `images`: a vision.ImageInputs."""
        backend = resolve_backend(cfg.model.attention, device)
        rows, lengths = 1, ()
        if backend == "flex":
            rows, lengths = static_shapes(all_units or [units], cfg.packing, cfg.trainer.micro_batch_size)
        return cls(units, pad_id, backend, device, cfg.packing.pad_multiple,
                   mask_documents=cfg.layout.name != "unmasked", restart_positions=cfg.layout.restart_positions,
                   rows=rows, lengths=lengths, images=images)

    def with_units(self, units: Units) -> "Scorer":
        return replace(self, units=units)

    def batch(self, mb: MicroBatch | None) -> PackedBatch:
        """The tensors of `mb` on the device; None gives an empty micro-batch (pad rows only)."""
        need = mb.row_length if mb is not None else 0
        length = next((n for n in self.lengths if n >= need), None)
        with record_function("pptrain.collate"):
            return collate(self.units, mb, self.pad_id, self.pad_multiple, self.mask_documents,
                           self.restart_positions, self.rows, length, self.images).to(self.device)

    def mask(self, batch: PackedBatch):
        with record_function("pptrain.mask"):
            return build_mask(batch.doc_ids, batch.segment_ids, self.backend)

    def __call__(self, module, mb: MicroBatch | None) -> Scored:
        batch = self.batch(mb)
        mask = self.mask(batch)  # once per batch: the reference reuses it
        return Scored(batch, mask, forward_scores(module, batch, mask))
