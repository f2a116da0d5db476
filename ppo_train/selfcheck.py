"""Self-check on first use: the training path against plain separate forwards of the model.

No test on a CPU can prove the compiled flex kernel, NCCL or bf16 GEMMs on the user's GPU, so
a run proves itself on first contact (DESIGN.md, proof obligation 7). Before the first
optimizer update of every start (resumes included: a resume may run on another machine),
`self_check` scores this rank's first micro-batch the way training does, without gradients:
the Scorer (layout, packer, mask, attention kernel: flex BlockMask on CUDA, dense-mask SDPA on
the CPU) and the training module (PolicyModule's fused or chunked head, or RewardModule),
called through the DeepSpeed engine. A few of its responses are scored again by plain
separate forwards: `[prompt | response]` alone through the Hugging Face model's own forward,
with transformers' own "sdpa" attention (switched for the check and restored), default
position ids (Qwen2-VL computes its M-RoPE positions itself), no packing and the model's own
lm_head; log_softmax in float32 and a gather of the response tokens (the logit predicting
response token j sits at position len(prompt) + j - 1). For `loss=reward` the plain score is
the sequence classifier's own output (its score at the last token). Tokens come from the
tokenized examples, upstream of the layout, and a vision-language model's images from the
example's image references through the same processor.

Tolerance, per response, in nats (reward units for `loss=reward`), by precision:

    |training - plain| <= per_token * tokens + floor      (tokens = 1 for a reward)

    fp32  1e-4  + 1e-3   24-bit significand: correct paths agree within 1e-5 on a sum
                         (tests/equivalence); 10x room per token for a real model's larger
                         logits, longer sums and the GPU kernels' other summation orders
    tf32  1e-2  + 0.2    fp32 on CUDA where matmuls may run in TF32 (or, for a vision encoder,
                         cuDNN's TF32 convolutions, on by default): a 10-bit mantissa, as fp16
    fp16  1e-2  + 0.2    11-bit significand, 8x finer than bf16
    bf16  5e-2  + 1.0    8-bit significand: a logit of 20 rounds by up to 0.04; the per-token
                         bound scripts/gpu_check.py applies to flex against SDPA

Why per token: rounding differences between two correct computations accumulate over the
response's tokens; linear in the count rather than sqrt, because rounding in low precision is
not unbiased (a systematic shift of the logsumexp adds up token by token) and a false alarm
stops a user's run. The floor covers short responses, where one token's rounding dominates.
What the check is for is not rounding: a mask that lets a response see another, positions that
do not restart, a wrong label shift or a broken kernel move a trained model's log-probs by
tenths of a nat or more on every affected token, and NaN fails any bound. Measured on the CPU
(fp32, tiny random models): the two paths agree within 1e-7 to 1.2e-5 per response (every
loss, layout and packer, ZeRO 0-3, LoRA, both tiny VLMs); responses that see each other move
the sums by 0.08-0.16, 3e-3 per token, about 20x the bound even on a random model (whose
near-uniform predictions hide most of it).

`layout=unmasked` is inexact by design (packed sequences see each other): skipped, and the
first metrics row says so. Under ZeRO-3 every forward gathers parameters collectively, so every
rank makes the same calls: one training-path forward (an empty micro-batch included) and the
same number of plain forwards (the maximum over ranks; a rank with fewer responses repeats its
last one, or a two-token text sequence when it has none). The result goes into the first
metrics row this process writes: `self_check/max_abs_diff` (over every rank's responses),
`self_check/responses` (how many were compared) and `self_check/seconds` (rank 0's time). The
cost is one no-grad forward of the micro-batch plus a few short forwards, once per start: 0.12 s
on the default job, whose steps take 0.5-1 s (README, "Self-check on first use").
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import asdict, dataclass

import torch

from ppo_train.dist import DistInfo, gather_objects, reduce_number
from ppo_train.errors import SelfCheckFailed
from ppo_train.logps import ResponseLogps
from ppo_train.scoring import RewardModule
from ppo_train.vision import is_vision_config

TOLERANCES = {"fp32": (1e-4, 1e-3), "tf32": (1e-2, 0.2), "fp16": (1e-2, 0.2), "bf16": (5e-2, 1.0)}
UNITS = 3  # units checked per rank: the first, the one deepest into its row, the last
RESPONSES_PER_UNIT = 4  # at most this many responses of each (ranked data may have more)
SKIPPED = "skipped: layout=unmasked is inexact by design"


@dataclass
class Case:
    """One response to score both ways."""

    unit: int  # unit uid (= index into the tokenized examples)
    k: int  # response index within the unit
    index: int  # response index within the micro-batch (where the training path's score is)
    prompt: list[int]
    response: list[int]
    images: list  # the prompt's image references ([] for text)


@dataclass
class Compared:
    """One response's two scores (picklable: ranks exchange their worst one)."""

    unit: int
    k: int
    tokens: int
    trained: float
    plain: float
    diff: float
    allowed: float
    rank: int = 0

    @property
    def excess(self) -> float:
        """diff / allowed; inf for a non-finite score (NaN fails every bound)."""
        return self.diff / self.allowed if math.isfinite(self.diff) else math.inf


def self_check(cfg, engine, scorer, examples: list, step, dist: DistInfo) -> dict:
    """Compare the training path with plain forwards on this rank's first micro-batch of `step`
    (the first step of this start; None when nothing is left to train). Returns the keys for
    the first metrics row; raises SelfCheckFailed on every rank when any rank is past the
    tolerance. `examples`: the tokenized training examples (data.examples)."""
    if not cfg.trainer.self_check or step is None:
        return {}
    if cfg.layout.name == "unmasked":
        return {"self_check": SKIPPED}
    began = time.perf_counter()
    mb = step.micro_batches[0]  # None: an empty micro-batch (this rank has no data this step)
    reward = isinstance(engine.module, RewardModule)
    key = precision_key(str(cfg.trainer.precision), dist.device, scorer.images is not None)
    with _no_side_effects(engine, dist.device):
        scored = scorer(engine, mb)
        cases = pick_cases(scored.batch, mb, examples)
        rounds = int(reduce_number(len(cases), dist, "max"))  # the same forwards on every rank (ZeRO-3)
        plain = plain_scores(engine.module.model, cases, rounds, scorer, reward)
    compared = compare(scored.scores, cases, plain, TOLERANCES[key], dist.rank)
    precision = f"{cfg.trainer.precision}{' (TF32 allowed)' if key == 'tf32' else ''}"
    row = verdict(compared, dist, f"{describe_device(dist.device)}, attention kernel {scorer.backend}, "
                                  f"precision {precision}", reward)
    return row | {"self_check/seconds": time.perf_counter() - began}


@contextlib.contextmanager
def _no_side_effects(engine, device: torch.device):
    """No gradients, no dropout (eval mode, restored after), and the random generators left
    where they were: the run's numbers must not depend on whether the check ran."""
    was_training = engine.module.training
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        engine.train(False)
        try:
            yield
        finally:
            engine.train(was_training)


def precision_key(precision: str, device: torch.device, vision: bool) -> str:
    """The TOLERANCES row: fp32 on CUDA counts as tf32 when fp32 matmuls may run in TF32 (or,
    for a vision encoder's convolutions, cuDNN's TF32, which is on by default)."""
    if precision == "fp32" and device.type == "cuda" and (
            torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
            or (vision and torch.backends.cudnn.allow_tf32)):
        return "tf32"
    return precision


def describe_device(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def checked_units(mb) -> list[int]:
    """Up to UNITS units of a micro-batch: the first, the one that starts deepest into its row
    (late blocks of the mask, positions restarting far from 0) and the last, without repeats."""
    if mb is None:
        return []
    deepest, start = mb.units[0], -1
    for row in mb.rows:
        col = 0
        for piece in row:
            if col > start:
                deepest, start = piece.unit, col
            col += piece.hi - piece.lo
    return list(dict.fromkeys([mb.units[0], deepest, mb.units[-1]]))[:UNITS]


def pick_cases(batch, mb, examples: list) -> list[Case]:
    """The responses to check, with their plain [prompt | response] tokens from the tokenized
    examples (not from the layout: the layout is part of what is checked)."""
    where = {(int(u), int(k)): i for i, (u, k) in enumerate(zip(batch.response_unit.tolist(),
                                                                 batch.response_k.tolist()))}
    cases = []
    for u in checked_units(mb):
        ex = examples[u]
        for k, response in enumerate(ex.response_ids[:RESPONSES_PER_UNIT]):
            cases.append(Case(u, k, where[(u, k)], list(ex.prompt_ids), list(response), list(ex.images or [])))
    return cases


@contextlib.contextmanager
def _plain_attention(model):
    """transformers' own SDPA in the language model (pptrain's attention function is what the
    training path uses), restored after; also the M-RoPE delta that Qwen2-VL's forward caches
    on the model when it computes positions itself."""
    text = model.config.get_text_config()
    before = text._attn_implementation
    body = getattr(model, model.base_model_prefix, None)
    deltas = getattr(body, "rope_deltas", None)
    as_set = (lambda impl: {"text_config": impl}) if is_vision_config(model.config) else (lambda impl: impl)
    model.set_attn_implementation(as_set("sdpa"))  # a VLM's vision encoder keeps its own (model._attention_for)
    try:
        yield
    finally:
        model.set_attn_implementation(as_set(before))
        if body is not None and hasattr(body, "rope_deltas"):
            body.rope_deltas = deltas


def plain_scores(model, cases: list[Case], rounds: int, scorer, reward: bool) -> list[float]:
    """The plain score of each case, in `rounds` >= len(cases) forwards: the extra ones (ZeRO-3
    needs the same forwards on every rank) repeat the last case, or score a two-token text
    sequence on a rank without responses (which would skip a vision encoder's gathers: ZeRO-3
    across processes is refused for vision-language models, train._vision_zero_stage); their
    results are dropped."""
    filler = cases[-1] if cases else Case(-1, -1, -1, [scorer.pad_id], [scorer.pad_id], [])
    out = []
    with _plain_attention(model):
        for i in range(rounds):
            score = plain_score(model, cases[i] if i < len(cases) else filler, scorer, reward)
            if i < len(cases):
                out.append(score)
    return out


def plain_score(model, case: Case, scorer, reward: bool) -> float:
    """One [prompt | response] sequence (1, P + R) through the model's own forward: the sum of
    the response's token log-probs (fp32 log_softmax, fp64 sum), or the classifier's score."""
    ids = torch.tensor([case.prompt + case.response], dtype=torch.long, device=scorer.device)
    params = inspect.signature(model.forward).parameters
    extra = {}
    if case.images:  # the processor's tensors for this prompt's images, as collate makes them
        extra = {k: v.to(scorer.device) for k, v in scorer.images(case.images).items()}
        if "mm_token_type_ids" in params:  # M-RoPE: which tokens are image tokens (get_rope_index)
            extra["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
    if reward:
        return float(model(input_ids=ids, use_cache=False, **extra).logits.reshape(-1)[0].double())
    n = len(case.response)
    if "logits_to_keep" in params:  # the head on the last n + 1 positions only: (n + 1, V), not (P + R, V)
        extra["logits_to_keep"] = n + 1
    logits = model(input_ids=ids, use_cache=False, **extra).logits[0, -(n + 1):-1]  # (n, V): predict response
    logps = logits.float().log_softmax(-1).gather(-1, ids[0, -n:, None]).squeeze(-1)
    return float(logps.double().sum())


def compare(scores: ResponseLogps, cases: list[Case], plain: list[float], tolerance: tuple[float, float],
            rank: int = 0) -> list[Compared]:
    """Each case's training-path score (scores.sums (R,), counts (R,)) against its plain score."""
    per_token, floor = tolerance
    out = []
    for case, p in zip(cases, plain):
        trained, tokens = float(scores.sums[case.index]), int(scores.counts[case.index])
        out.append(Compared(case.unit, case.k, tokens, trained, p, abs(trained - p), per_token * tokens + floor, rank))
    return out


def verdict(compared: list[Compared], dist: DistInfo, setup: str, reward: bool) -> dict:
    """Every rank's worst response (the largest diff / allowed) and largest difference, the same
    on every rank; SelfCheckFailed on every rank when any response is past its tolerance."""
    worst = max(compared, key=lambda c: c.excess, default=None)
    largest = max((c.diff if math.isfinite(c.diff) else math.inf for c in compared), default=0.0)
    ranks = gather_objects((len(compared), largest, asdict(worst) if worst else None), dist)
    responses = sum(n for n, _, _ in ranks)
    worst = max((Compared(**w) for _, _, w in ranks if w), key=lambda c: c.excess, default=None)
    if worst is not None and not worst.excess <= 1.0:
        what = "reward" if reward else f"log-prob sum ({worst.tokens} tokens)"
        where = f" on rank {worst.rank}" if dist.world_size > 1 else ""
        raise SelfCheckFailed(
            f"self-check failed{where} on {setup}: unit {worst.unit} response {worst.k}: the training path's "
            f"{what} is {worst.trained:.6g}, a plain separate forward of the model gives {worst.plain:.6g} "
            f"(difference {worst.diff:.3g}, tolerance {worst.allowed:.3g}); the training path's scores are wrong "
            "on this setup (report this line); trainer.self_check=false turns the check off")
    return {"self_check/max_abs_diff": max(largest for _, largest, _ in ranks), "self_check/responses": responses}
