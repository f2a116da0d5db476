"""Vision-language models: prefix sharing and packing do not change the math, and the vision
encoder runs once per prompt in the shared layout.

For the tiny Qwen2-VL-style model (3-D M-RoPE positions) and the tiny LLaVA-style model (1-D
positions), both in float32 with random weights: per-response log-prob sums of `layout=shared`
(and `paired`) with every packer equal separate `[images + prompt | response]` forwards done the
model's own way (the processor's pixel values, the model's own position ids from the whole
sequence, its default causal mask), within 1e-5, for K = 2, 3, 4 responses, with bundled
photographs of different sizes (and two-image prompts) packed into shared rows. The DPO loss and
its gradients (vision encoder included) match the paired computation.
"""

from __future__ import annotations

import random
from functools import cache

import pytest
import torch
from omegaconf import OmegaConf

from ppo_train.cli import compose
from ppo_train.data.layout import build_units
from ppo_train.data.packing import plan_epoch
from ppo_train.data.sources import PreferenceExample
from ppo_train.data.tokenize import tokenize_examples
from ppo_train.fileio import asset_path
from ppo_train.logps import ResponseLogps
from ppo_train.losses import dpo_loss
from ppo_train.model import image_inputs, load_causal_lm, load_tokenizer, load_vision
from ppo_train.scoring import PolicyModule, Scorer, static_shapes
from ppo_train.vision import open_image, vision_tower
from tests.equivalence.test_shared_vs_paired import _compare

PACKINGS = {
    "none": OmegaConf.create({"name": "none", "pad_multiple": 64}),
    "sorted": OmegaConf.create({"name": "sorted", "pad_multiple": 64}),
    "ffd": OmegaConf.create({"name": "ffd", "row_tokens": 512, "rows_per_batch": 2, "pad_multiple": 64}),
}
PHOTOS = ["astronaut", "camera", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "brick"]
WORDS = "the a cat sky red blue small large left right image shows there is one two three near far".split()
DATASET = OmegaConf.create({"path": "synthetic", "on_invalid": "error", "max_prompt_length": 4096,
                            "max_response_length": 4096, "length_policy": "truncate"})


@cache
def tiny(arch: str):
    """(model config, tokenizer, VisionText) of the bundled tiny model `arch`."""
    cfg = compose([f"model=tiny_{arch}"])
    tokenizer = load_tokenizer(cfg.model)
    return cfg, tokenizer, load_vision(cfg.model, tokenizer)


def model_of(arch: str, seed: int = 0):
    cfg, tokenizer, _ = tiny(arch)
    return load_causal_lm(cfg.model, len(tokenizer), torch.float32, "sdpa", seed).eval()


def image_examples(n: int, k: int, seed: int) -> list[PreferenceExample]:
    """n rows, each with one or two bundled photographs (sizes differ) and k responses."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        photos = rng.sample(PHOTOS, 2 if i % 3 == 0 else 1)
        parts = [{"type": "image"} for _ in photos]
        text = {"type": "text", "text": " ".join(rng.choices(WORDS, k=rng.randint(2, 12))) + "?"}
        parts = parts + [text] if i % 2 == 0 else [text] + parts
        responses = [[{"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 20)))}]
                     for _ in range(k)]
        out.append(PreferenceExample(
            index=i, prompt=[{"role": "user", "content": parts}], responses=responses,
            pairs=[(a, b) for a in range(k) for b in range(a + 1, k)],
            images=[str(asset_path(f"vision/images/{p}.jpg")) for p in photos]))
    return out


def tokenized(arch: str, examples):
    _, tokenizer, vision = tiny(arch)
    return tokenize_examples(examples, tokenizer, DATASET, vision=vision)[0]


def separate_logps(model, arch: str, examples, tokens) -> dict[tuple[int, int], float]:
    """The plain computation, the model's own way: the processor's outputs for the prompt and its
    images, the response ids appended, no position ids and no mask (the model derives both)."""
    _, _, vision = tiny(arch)
    out = {}
    with torch.no_grad():
        for ex, tok in zip(examples, tokens):
            text = vision.processor.apply_chat_template(ex.prompt, tokenize=False, add_generation_prompt=True)
            inputs = vision.processor(text=[text], images=[open_image(r) for r in ex.images], return_tensors="pt",
                                      add_special_tokens=False)
            assert inputs["input_ids"][0].tolist() == tok.prompt_ids, "the processor tokenizes the prompt otherwise"
            extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
            for k, r in enumerate(tok.response_ids):
                ids = torch.tensor([tok.prompt_ids + r])
                kw = dict(extra)
                if "mm_token_type_ids" in kw:
                    kw["mm_token_type_ids"] = torch.cat([kw["mm_token_type_ids"], torch.zeros(1, len(r), dtype=torch.int)], 1)
                logp = model(input_ids=ids, **kw).logits[0, :-1].float().log_softmax(-1)
                got = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
                out[(ex.index, k)] = float(got[len(tok.prompt_ids) - 1:].double().sum())
    return out


class EncoderCount:
    """Images and calls through the vision encoder (a forward hook)."""

    def __init__(self, model):
        self.images = self.calls = 0
        self.handle = vision_tower(model).register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        grid = kwargs.get("grid_thw")
        self.calls += 1
        self.images += int(grid.shape[0]) if grid is not None else int(args[0].shape[0])


def packed_logps(model, arch: str, tokens, layout: str, packing: str, micro: int = 2):
    """(log-prob sums by (row, response), encoder images, encoder calls, rows with several image sizes)."""
    _, tokenizer, vision = tiny(arch)
    units = build_units(tokens, layout)
    scorer = Scorer(units, tokenizer.pad_token_id, pad_multiple=64, images=image_inputs(vision))
    module = PolicyModule(model, logits_chunk=7)
    count, out, mixed = EncoderCount(model), {}, 0
    try:
        with torch.no_grad():
            for mb in plan_epoch(units, PACKINGS[packing], micro, seed=1, epoch=0):
                scored = scorer(module, mb)
                b = scored.batch
                for u, k, s in zip(b.response_unit.tolist(), b.response_k.tolist(), scored.scores.sums.tolist()):
                    out[(tokens[u].index, k)] = s
                mixed += _rows_with_mixed_sizes(units, mb)
    finally:
        count.handle.remove()
    return out, count.images, count.calls, mixed


def _rows_with_mixed_sizes(units, mb) -> int:
    """Rows of a micro-batch that hold at least two photographs of different pixel sizes."""
    mixed = 0
    for row in mb.rows:
        sizes = {open_image(r).size for piece in row for lo, refs in units[piece.unit].images
                 if piece.lo <= lo < piece.hi for r in refs}
        mixed += len(sizes) >= 2
    return mixed


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("packing", ["none", "sorted", "ffd"])
def test_shared_image_logps_equal_separate_forwards(arch, k, packing):
    model = model_of(arch)
    examples = image_examples(6, k, seed=k)
    tokens = tokenized(arch, examples)
    images = sum(len(ex.images) for ex in examples)
    want = separate_logps(model, arch, examples, tokens)
    shared, encoded, calls, mixed = packed_logps(model, arch, tokens, "shared", packing)
    _compare(shared, want, 1e-5, f"shared/{packing}/{arch}/K={k}")
    assert encoded == images, f"shared: {encoded} images through the encoder for {images} prompt images"
    if packing == "ffd":
        assert mixed >= 1, "no packed row held photographs of two sizes: the test would not cover it"
    paired, encoded, _, _ = packed_logps(model, arch, tokens, "paired", packing)
    _compare(paired, want, 1e-5, f"paired/{packing}/{arch}/K={k}")
    assert encoded == k * images, f"paired: {encoded} images through the encoder, expected K x {images}"


def test_mrope_responses_continue_from_the_prompt_on_every_axis():
    """Each response's 3-D positions in a shared unit equal those the model's own rule gives the
    separate [images + prompt | response] sequence."""
    _, _, vision = tiny("qwen2_vl")
    examples = image_examples(4, 3, seed=5)
    tokens = tokenized("qwen2_vl", examples)
    for ex, tok, unit in zip(examples, tokens, build_units(tokens, "shared")):
        text = vision.processor.apply_chat_template(ex.prompt, tokenize=False, add_generation_prompt=True)
        inputs = vision.processor(text=[text], images=[open_image(r) for r in ex.images], return_tensors="pt",
                                  add_special_tokens=False)
        p = len(tok.prompt_ids)
        assert (unit.mrope[:, :p] != unit.mrope[0, :p]).any(), "the prompt's image tokens have no 2-D grid"
        for k, r in enumerate(tok.response_ids):
            ids = torch.tensor([tok.prompt_ids + r])
            kinds = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(r), dtype=torch.int)], 1)
            want, _ = vision.rope.model.get_rope_index(ids, mm_token_type_ids=kinds,
                                                       image_grid_thw=inputs["image_grid_thw"])
            start = int(unit.resp_start[k])
            got = torch.from_numpy(unit.mrope[:, list(range(p)) + list(range(start, start + len(r)))])
            assert torch.equal(got, want[:, 0]), f"row {ex.index} response {k}: 3-D positions differ"


def _dpo_loss_and_grads(model, arch, tokens, layout, packing):
    _, tokenizer, vision = tiny(arch)
    units = build_units(tokens, layout)
    scorer = Scorer(units, tokenizer.pad_token_id, pad_multiple=64, images=image_inputs(vision))
    module = PolicyModule(model, logits_chunk=16)
    cfg = OmegaConf.create({"beta": 0.1, "variant": "sigmoid", "label_smoothing": 0.0})
    total_pairs = sum(len(u.pairs) for u in units)
    model.zero_grad()
    loss_total = 0.0
    for mb in plan_epoch(units, PACKINGS[packing], 2, seed=3, epoch=0):
        scored = scorer(module, mb)
        pol = scored.scores
        ref = ResponseLogps(pol.sums.detach() - (scored.batch.response_k.double() + 1.0) * 3.0, pol.counts)
        per_pair, _ = dpo_loss(pol, ref, scored.batch.pairs, cfg)
        loss = per_pair.sum() / total_pairs
        loss.backward()
        loss_total += float(loss.detach())
    return loss_total, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
@pytest.mark.parametrize("k", [2, 3])
def test_dpo_loss_and_gradients_shared_equal_paired(arch, k):
    tokens = tokenized(arch, image_examples(5, k, seed=30 + k))
    loss_p, grads_p = _dpo_loss_and_grads(model_of(arch), arch, tokens, "paired", "none")
    loss_s, grads_s = _dpo_loss_and_grads(model_of(arch), arch, tokens, "shared", "ffd")
    assert abs(loss_s - loss_p) <= 1e-5, f"loss shared {loss_s} vs paired {loss_p}"
    assert grads_s.keys() == grads_p.keys()
    assert any("visual" in n or "vision_tower" in n for n in grads_p), "the vision encoder got no gradient"
    scale = max(float(g.abs().max()) for g in grads_p.values())
    worst = max(float((grads_s[n] - grads_p[n]).abs().max()) for n in grads_p)
    assert scale > 0, "gradients are all zero: the test would prove nothing"
    assert worst <= 1e-4 * scale + 1e-6, f"max |grad diff| {worst:.3g} vs largest grad {scale:.3g}"


def flex_image_logps(arch: str, device: torch.device, examples) -> tuple[dict, int]:
    """Per-response log-prob sums through the flex path (BlockMask, static shapes) over shared,
    ffd-packed image units on `device`, and the images the encoder saw. Compiled on CUDA; on the
    CPU flex attention runs unfused, which checks the same mask and positions."""
    cfg, tokenizer, vision = tiny(arch)
    tokens = tokenized(arch, examples)
    model = load_causal_lm(cfg.model, len(tokenizer), torch.float32, "flex", 0).to(device).eval()
    units = build_units(tokens, "shared")
    rows, lengths = static_shapes([units], PACKINGS["ffd"], 2)
    scorer = Scorer(units, tokenizer.pad_token_id, "flex", device, 64, rows=rows, lengths=lengths,
                    images=image_inputs(vision))
    count, got = EncoderCount(model), {}
    try:
        with torch.no_grad():
            for mb in plan_epoch(units, PACKINGS["ffd"], 2, seed=1, epoch=0):
                b = (scored := scorer(PolicyModule(model, logits_chunk=7), mb)).batch
                for u, k, s in zip(b.response_unit.tolist(), b.response_k.tolist(), scored.scores.sums.tolist()):
                    got[(tokens[u].index, k)] = s
    finally:
        count.handle.remove()
    return got, count.images


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
def test_flex_rendering_of_image_rows_equals_separate_forwards(arch):
    examples = image_examples(8, 3, seed=11)
    want = separate_logps(model_of(arch), arch, examples, tokenized(arch, examples))
    got, encoded = flex_image_logps(arch, torch.device("cpu"), examples)
    _compare(got, want, 1e-5, f"flex/ffd/{arch}")
    assert encoded == sum(len(ex.images) for ex in examples)
