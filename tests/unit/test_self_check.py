"""The self-check's comparison (ppo_train/selfcheck.py) on a tiny random model, without
training: its plain scores equal an independent separate forward, its training-path scores
equal the packed computation, the tolerance rule refuses past the bound (and on NaN), and an
empty micro-batch or extra ZeRO-3 rounds change nothing."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

import ppo_train.model  # noqa: F401 - registers pptrain's attention functions
from ppo_train.data.layout import build_units
from ppo_train.data.schedule import Schedule, Step
from ppo_train.dist import SINGLE
from ppo_train.errors import PptrainError, SelfCheckFailed
from ppo_train.scoring import PolicyModule, Scorer
from ppo_train.selfcheck import TOLERANCES, Compared, pick_cases, plain_scores, self_check, verdict
from tests.conftest import random_examples, tiny_model

FFD = OmegaConf.create({"name": "ffd", "row_tokens": 256, "rows_per_batch": 2, "pad_multiple": 128})
CFG = OmegaConf.create({"trainer": {"self_check": True, "precision": "fp32"}, "layout": {"name": "shared"}})


class BareEngine:
    """What self_check uses of ppo_train.engine.Engine: `module`, calling it, `train(mode)`."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)


def independent_logps(model, prompt: list[int], response: list[int]) -> float:
    """The plain computation written out separately: eager attention, full logits, the naive
    shift logits[:-1] vs ids[1:], log_softmax in float64."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
    return float(logp.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(prompt) - 1:].sum())


def setup(k: int = 3):
    examples = random_examples(8, k, seed=3)
    units = build_units(examples, "shared")
    model = tiny_model("llama", attn="pptrain_sdpa", seed=1)
    engine = BareEngine(PolicyModule(model, logits_chunk=7))
    engine.train(True)
    step = next(Schedule(units, FFD, 2, seed=0).steps())
    return examples, units, model, engine, Scorer(units, pad_id=0), step


def test_comparison_matches_an_independent_computation_with_ffd_and_three_responses():
    examples, units, model, engine, scorer, step = setup(k=3)
    mb = step.micro_batches[0]
    assert len(mb.units) >= 3 and len(mb.rows) == 2, mb  # several units packed into ffd rows

    row = self_check(CFG, engine, scorer, examples, step, SINGLE)

    assert engine.module.training, "train mode is restored"
    assert model.config._attn_implementation == "pptrain_sdpa", "the attention function is restored"
    with torch.no_grad():  # as the check scores it
        scored = scorer(engine, mb)
    cases = pick_cases(scored.batch, mb, examples)
    assert len(cases) == row["self_check/responses"] >= 6 and all(len({c.k for c in cases if c.unit == u}) == 3
                                                                  for u in {c.unit for c in cases})
    eager = tiny_model("llama", attn="eager", seed=1)  # the same weights, another attention code
    want = {(c.unit, c.k): independent_logps(eager, c.prompt, c.response) for c in cases}
    with torch.no_grad():
        plain = plain_scores(model, cases, len(cases), scorer, reward=False)
    trained = {(c.unit, c.k): float(scored.scores.sums[c.index]) for c in cases}
    plain_err = max(abs(p - want[(c.unit, c.k)]) for c, p in zip(cases, plain))
    train_err = max(abs(trained[key] - want[key]) for key in want)
    diffs = [abs(trained[(c.unit, c.k)] - p) for c, p in zip(cases, plain)]
    print(f"plain vs independent {plain_err:.3g}, training path vs independent {train_err:.3g}, "
          f"check's max_abs_diff {row['self_check/max_abs_diff']:.3g}")
    assert plain_err <= 1e-5 and train_err <= 1e-5, (plain_err, train_err)
    assert row["self_check/max_abs_diff"] == pytest.approx(max(diffs), abs=1e-9)
    assert row["self_check/max_abs_diff"] < TOLERANCES["fp32"][1], row


def test_extra_rounds_and_an_empty_micro_batch_change_nothing():
    """Extra plain forwards (ZeRO-3: the maximum count over ranks) repeat the last case and are
    dropped; a rank with an empty micro-batch compares nothing and still runs its forwards."""
    examples, units, model, engine, scorer, step = setup(k=2)
    with torch.no_grad():
        scored = scorer(engine, step.micro_batches[0])
    cases = pick_cases(scored.batch, step.micro_batches[0], examples)
    with torch.no_grad():
        exact = plain_scores(model, cases, len(cases), scorer, reward=False)
        padded = plain_scores(model, cases, len(cases) + 2, scorer, reward=False)
        filler_only = plain_scores(model, [], 2, scorer, reward=False)
    assert padded == exact and filler_only == [], (exact, padded, filler_only)
    empty = Step(0, 0, [None], 0, [])
    row = self_check(CFG, engine, scorer, examples, empty, SINGLE)
    assert row["self_check/responses"] == 0 and row["self_check/max_abs_diff"] == 0.0, row


def test_tolerance_rule_refuses_past_the_bound_and_on_nan_in_one_line():
    per_token, floor = TOLERANCES["bf16"]
    allowed = per_token * 40 + floor
    inside = Compared(3, 1, 40, -100.0, -100.0 - allowed * 0.99, allowed * 0.99, allowed)
    row = verdict([inside], SINGLE, "cpu, attention kernel sdpa, precision bf16", reward=False)
    assert row == {"self_check/max_abs_diff": allowed * 0.99, "self_check/responses": 1}, row
    for diff in (allowed * 1.01, math.nan):
        outside = Compared(3, 1, 40, -100.0, -100.0 - diff, diff, allowed)
        with pytest.raises(SelfCheckFailed) as err:
            verdict([inside, outside], SINGLE, "cpu, attention kernel sdpa, precision bf16", reward=False)
        message = str(err.value)
        assert "\n" not in message and "unit 3 response 1" in message and "trainer.self_check=false" in message, message
        assert "precision bf16" in message and f"tolerance {allowed:.3g}" in message, message
    assert issubclass(SelfCheckFailed, PptrainError) and SelfCheckFailed.exit_code == 1


def test_off_and_unmasked_return_no_comparison():
    examples, units, model, engine, scorer, step = setup(k=2)
    off = OmegaConf.merge(CFG, {"trainer": {"self_check": False}})
    unmasked = OmegaConf.merge(CFG, {"layout": {"name": "unmasked"}})
    assert self_check(off, engine, scorer, examples, step, SINGLE) == {}
    assert self_check(unmasked, engine, scorer, examples, step, SINGLE) == {
        "self_check": "skipped: layout=unmasked is inexact by design"}
    assert self_check(CFG, engine, scorer, examples, None, SINGLE) == {}  # nothing left to train
