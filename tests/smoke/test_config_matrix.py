"""Proof obligation 8, the config space: every combination of ZeRO stage, reference mode, loss,
layout and packer either trains one optimizer step or is refused at config time, one line per
problem (a ConfigError from `config_check.validate` or `config.environment_problems`). It is
enumerated here, not sampled by hand.

Dimensions (new losses, layouts and packers join through LOSSES and the config Enums):
- zero: trainer.zero_stage 0, 1, 2, 3;
- reference: table (the default: the initial policy's precomputed log-probs), live
  (reference.live=true), separate (reference.name_or_path=<a saved tiny model>), separate_live
  (both). A reference-free loss has no reference: its default is shown as `noref` in test ids,
  and every reference setting with it must be refused;
- loss: every `loss=` option, each with the non-default parameters of LOSS_VARIANTS;
- layout: shared, paired, unmasked (always with model.lora.enabled=true, which it needs);
- packing: none, ffd, sorted;
- precision: fp32, bf16 (the two values trainer.precision=auto resolves to; bf16 mixed is autocast
  over fp32 weights at stage 0 and DeepSpeed's bf16 at stages 1-3, ppo_train/precision.py; fp16
  is refused at config time, tests/unit/test_precision.py).

Default suite: the classification of the whole product (composed and validated, no model), the
expected refusals and nothing else; one training step for each combination of a pairwise
covering set of the accepted one-rank combinations (every pair of values of any two dimensions
that occurs among them occurs in a trained one). Slow: the full product on one rank, and a
pairwise covering set over stages 1-3 on two ranks (torchrun, gloo), run one after the other in
one process group by tests/smoke/matrix_driver.py.

`python -m tests.smoke.test_config_matrix` prints the counts (for the README).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import NamedTuple

import pytest

from ppo_train.config import Layout, Packer
from ppo_train.losses import LOSSES
from tests.conftest import child_env
from tests.smoke.matrix_driver import cache_peak_flops, release_deepspeed_engines

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / "matrix_driver.py"

STAGES = ("0", "1", "2", "3")
MULTI_RANK_STAGES = ("1", "2", "3")
REFERENCES = ("table", "live", "separate", "separate_live")
# Each loss runs with one non-default parameter (a new loss without an entry runs its defaults).
LOSS_VARIANTS: dict[str, list[str]] = {
    "dpo": ["loss.variant=ipo"],
    "simpo": ["loss.label_smoothing=0.1"],
    "orpo": ["loss.orpo_lambda=0.5"],
    "reward": ["loss.center_coef=0.01"],
    "kto": ["loss.undesirable_weight=1.33"],
    "sft": [],  # no parameters
}
PRECISIONS = ("fp32", "bf16")
DIMENSIONS = ("zero", "reference", "loss", "layout", "packing", "precision")
VALUES = {"zero": STAGES, "reference": REFERENCES, "loss": tuple(LOSSES),
          "layout": tuple(m.value for m in Layout), "packing": tuple(m.value for m in Packer), "precision": PRECISIONS}
# One step of a tiny run (about 2 s on 2 CPU cores).
TINY = ["dataset.num_rows=8", "trainer.max_steps=1", "trainer.save_model=false", "trainer.save_every=0",
        "logging.progress=false", "trainer.grad_accum=1"]
RUN_NAME = "run_name=matrix"


class Combo(NamedTuple):
    zero: str
    reference: str
    loss: str
    layout: str
    packing: str
    precision: str = "fp32"

    @property
    def id(self) -> str:
        reference = self.reference
        if reference == "table" and not LOSSES[self.loss].needs_reference:
            reference = "noref"
        return f"zero{self.zero}-{reference}-{self.loss}-{self.layout}-{self.packing}-{self.precision}"

    def group_overrides(self) -> list[str]:
        return [f"loss={self.loss}", f"layout={self.layout}", f"packing={self.packing}"]

    def value_overrides(self, ref_dir: str | Path) -> list[str]:
        out = [f"trainer.zero_stage={self.zero}", f"trainer.precision={self.precision}", *LOSS_VARIANTS.get(self.loss, [])]
        if self.reference in ("live", "separate_live"):
            out.append("reference.live=true")
        if self.reference in ("separate", "separate_live"):
            out.append(f"reference.name_or_path={ref_dir}")
        if self.layout == "unmasked":
            out.append("model.lora.enabled=true")
        return out

    def overrides(self, ref_dir: str | Path) -> list[str]:
        return self.group_overrides() + self.value_overrides(ref_dir)


def product(stages: Sequence[str] = STAGES) -> list[Combo]:
    """Every combination, in a fixed order."""
    return [Combo(*values) for values in itertools.product(stages, *(VALUES[d] for d in DIMENSIONS[1:]))]


def expected_problems(combo: Combo) -> list[str]:
    """The leading words (before the first ':') of the problems validate should name for this
    combination; empty = it should be accepted. What the layout=unmasked refusal names for a new
    loss is a guess (a reference or a reward head need exact scores): the classification test
    says so when it is wrong."""
    spec, out = LOSSES[combo.loss], []
    if not spec.needs_reference and combo.reference in ("live", "separate_live"):
        out.append("reference.live")
    if not spec.needs_reference and combo.reference in ("separate", "separate_live"):
        out.append("reference.name_or_path")
    if combo.layout == "unmasked":
        if spec.needs_reference or spec.reward_head:
            out.append(f"layout=unmasked with loss={combo.loss}")
        if combo.packing != "ffd":
            out.append(f"layout=unmasked with packing={combo.packing}")
    return out


def expected_accepted(stages: Sequence[str] = STAGES) -> list[Combo]:
    return [c for c in product(stages) if not expected_problems(c)]


# --- composing and classifying -------------------------------------------------------------

@cache
def _composed_groups(groups: tuple[str, ...]):
    from ppo_train.cli import compose

    return compose([*groups, RUN_NAME])


def fast_compose(combo: Combo, ref_dir: str | Path, extra: Sequence[str] = ()):
    """What `ppo_train.cli.compose([*combo.overrides(ref_dir), *extra, "run_name=matrix"])`
    builds, about 30x faster: the group choices are composed once (cached), and the value
    overrides are applied as Hydra applies them after composing (each parsed by Hydra's override
    parser, then `OmegaConf.update(cfg, key, value, merge=True)`). The trained combinations
    check that both are equal (test_pairwise_one_rank_trains_one_step)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    cfg = copy.deepcopy(_composed_groups(tuple(combo.group_overrides())))
    for override in OverridesParser.create().parse_overrides([*combo.value_overrides(ref_dir), *extra]):
        OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
    return cfg


def refusal(cfg) -> list[str] | None:
    """The config-time problems of a composed config (None: accepted), as the command line
    checks it before training: validate, then what this machine cannot run. Every problem must
    be one line."""
    from ppo_train.config import environment_problems
    from ppo_train.config_check import validate
    from ppo_train.errors import ConfigError

    try:
        validate(cfg)
        problems = environment_problems(cfg)
    except ConfigError as err:
        problems = list(err.problems)
    multi_line = [p for p in problems if "\n" in str(p) or not str(p).strip()]
    assert not multi_line, f"problems must be one line each: {multi_line}"
    return problems or None


def classify(ref_dir: str | Path, combos: Sequence[Combo] | None = None) -> dict[Combo, list[str] | None]:
    """Every combination (the full product by default) -> its refusal (None when accepted).
    Only local-path existence depends on `ref_dir` (any existing folder classifies alike)."""
    return {c: refusal(fast_compose(c, ref_dir)) for c in (product() if combos is None else combos)}


# --- the pairwise covering set -------------------------------------------------------------

def _pairs(row: Sequence) -> set[tuple]:
    return {(i, row[i], j, row[j]) for i in range(len(row)) for j in range(i + 1, len(row))}


def pairwise_cover(candidates: Sequence[Sequence]) -> list:
    """A small subset of `candidates` (tuples of equal length, one value per dimension) in which
    every pair of values of two dimensions that occurs in some candidate occurs in a chosen one.
    Greedy and deterministic: repeatedly take the first candidate (in the given order) with the
    largest gain, where each pair not yet covered counts 1 / (the number of candidates that hold
    it), so that rare pairs (the only way to cover them) are taken early and common ones come
    along. Exact fractions: float sums over sets would depend on the hash seed's set order.
    (Counting every pair as 1 took 31 one-rank combinations where 28 is the lower bound; this
    takes 29.)"""
    candidates = list(dict.fromkeys(candidates))
    pairs = [_pairs(c) for c in candidates]
    uncovered = set().union(*pairs) if pairs else set()
    chosen = []
    while uncovered:
        holders = Counter(p for ps in pairs for p in ps & uncovered)
        gains = [sum((Fraction(1, holders[p]) for p in ps & uncovered), Fraction(0)) for ps in pairs]
        best = max(range(len(candidates)), key=gains.__getitem__)  # the first of the best
        chosen.append(candidates[best])
        uncovered -= pairs[best]
    return chosen


ONE_RANK_PAIRWISE = pairwise_cover(expected_accepted())
TWO_RANK_PAIRWISE = pairwise_cover(expected_accepted(MULTI_RANK_STAGES))


@cache
def classified(ref_dir: str) -> dict[Combo, list[str] | None]:
    """classify(ref_dir) over the full product, once per process and folder."""
    return classify(ref_dir)


def counts(classes: dict[Combo, list[str] | None] | None = None) -> dict[str, int]:
    """The numbers for the README, from the classification (by composing and validating) of the
    full product; without one, it is made with an empty folder as the separate reference."""
    if classes is None:
        import tempfile

        with tempfile.TemporaryDirectory() as ref_dir:  # refusals depend only on the folder existing
            classes = classify(ref_dir)
    accepted = [c for c, problems in classes.items() if problems is None]
    return {"product": len(classes), "refused_at_config_time": len(classes) - len(accepted),
            "trained_one_rank": len(accepted),
            "two_rank_product_stages_1_3": len(product(MULTI_RANK_STAGES)),
            "two_rank_accepted_stages_1_3": sum(c.zero in MULTI_RANK_STAGES for c in accepted),
            "pairwise_one_rank": len(pairwise_cover(accepted)),
            "pairwise_two_ranks": len(pairwise_cover([c for c in accepted if c.zero in MULTI_RANK_STAGES]))}


# --- fixtures and helpers ------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _peak_measured_once():
    """flops.calibrate_peak once per module (matrix_driver.cache_peak_flops)."""
    from ppo_train import flops

    original = flops.calibrate_peak
    cache_peak_flops()
    yield
    flops.calibrate_peak = original


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory) -> Path:
    """A saved tiny model (the policy's architecture and tokenizer, other weights) for
    reference.name_or_path, made once per module (as test_runtime.py makes one)."""
    import torch

    from ppo_train.cli import compose
    from ppo_train.model import load_causal_lm, load_tokenizer

    cfg = compose([RUN_NAME])
    tok = load_tokenizer(cfg.model)
    out = tmp_path_factory.mktemp("matrix_reference")
    load_causal_lm(cfg.model, len(tok), torch.float32, "sdpa", seed=1234).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def train_one_step(combo: Combo, ref_dir: Path, run_dir: Path, check_fast_compose: bool = False) -> dict | None:
    """Compose as the command line would, check at config time, train; the metrics row, or None
    when the combination was refused (its problems are checked to be one line each)."""
    from omegaconf import OmegaConf

    from ppo_train.cli import compose
    from ppo_train.train import train

    cfg = compose([*combo.overrides(ref_dir), *TINY, RUN_NAME])
    if check_fast_compose:
        fast = fast_compose(combo, ref_dir, TINY)
        assert OmegaConf.to_container(fast) == OmegaConf.to_container(cfg), combo.id
    if refusal(cfg) is not None:
        return None
    try:
        rows = train(cfg, run_dir)
    finally:
        release_deepspeed_engines()  # ZeRO-3 leaks each run's engine otherwise (see there)
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 1 and steps[0]["step"] == 1, rows
    assert steps[0]["loss"] is not None and math.isfinite(steps[0]["loss"]), steps[0]
    assert steps[0]["pairs"] > 0, steps[0]
    return steps[0]


# --- default suite -------------------------------------------------------------------------

def test_full_product_is_classified_with_the_expected_refusals(ref_dir):
    """The whole product composes and validates (no model): the refused combinations are exactly
    the expected ones (a reference setting with a reference-free loss; layout=unmasked with a
    loss that needs exact scores or without ffd packing), each problem one line naming what
    was expected."""
    classes = classified(str(ref_dir))
    assert len(classes) == math.prod(len(VALUES[d]) for d in DIMENSIONS)
    wrong = []
    for combo, problems in classes.items():
        want = expected_problems(combo)
        heads = sorted(p.split(":", 1)[0] for p in problems or [])
        if heads != sorted(want):
            wrong.append(f"{combo.id}: expected {want or 'accepted'}, got {problems or 'accepted'}")
    assert not wrong, f"{len(wrong)} combination(s) classified unexpectedly:\n" + "\n".join(wrong[:40])
    # the refusals the brief names, spelled out
    assert classes[Combo("0", "live", "simpo", "shared", "ffd")] is not None
    assert classes[Combo("3", "separate", "sft", "paired", "none")] is not None
    assert classes[Combo("0", "table", "dpo", "unmasked", "ffd")] is not None
    assert classes[Combo("0", "table", "reward", "unmasked", "ffd")] is not None
    assert classes[Combo("0", "table", "sft", "unmasked", "ffd")] is None
    assert classes[Combo("2", "separate_live", "dpo", "paired", "sorted")] is None


def test_pairwise_cover_covers_every_pair():
    """The generator's property on the real candidate sets and on a constrained toy space;
    deterministic; only candidates chosen."""
    toy = [c for c in itertools.product(range(3), range(3), range(2), "ab") if not (c[0] == 2 and c[3] == "b")]
    for candidates in (toy, expected_accepted(), expected_accepted(MULTI_RANK_STAGES)):
        chosen = pairwise_cover(candidates)
        assert set(chosen) <= set(candidates) and len(set(chosen)) == len(chosen)
        needed = set().union(*(_pairs(c) for c in candidates))
        covered = set().union(*(_pairs(c) for c in chosen))
        assert covered == needed, sorted(needed - covered)[:10]
        assert pairwise_cover(candidates) == chosen  # deterministic
        assert len(chosen) < len(candidates)
    assert pairwise_cover([]) == []
    # the lower bound: the two largest dimensions' value pairs that occur
    largest = max(len({(c[i], c[j]) for c in toy}) for i in range(4) for j in range(i + 1, 4))
    assert largest <= len(pairwise_cover(toy)) <= largest + 3


def test_counts(ref_dir, capsys):
    """The README's numbers (printed)."""
    n = counts(classified(str(ref_dir)))
    assert n["product"] == n["refused_at_config_time"] + n["trained_one_rank"]
    assert n["trained_one_rank"] == len(expected_accepted()) and n["pairwise_one_rank"] == len(ONE_RANK_PAIRWISE)
    assert n["pairwise_two_ranks"] == len(TWO_RANK_PAIRWISE)
    with capsys.disabled():
        print("\nconfig matrix:", json.dumps(n))


@pytest.mark.parametrize("combo", ONE_RANK_PAIRWISE, ids=lambda c: c.id)
def test_pairwise_one_rank_trains_one_step(combo, ref_dir, tmp_path):
    """One optimizer step for each combination of the pairwise covering set, in this process."""
    row = train_one_step(combo, ref_dir, tmp_path / "run", check_fast_compose=True)
    assert row is not None, f"{combo.id} was refused at config time but expected to be accepted"


# --- slow: the full product on one rank, the pairwise set on two ---------------------------

@pytest.mark.slow
@pytest.mark.parametrize("combo", product(), ids=lambda c: c.id)
def test_full_product_one_rank(combo, ref_dir, tmp_path):
    """Every combination trains one step or is refused at config time (one line per problem)."""
    train_one_step(combo, ref_dir, tmp_path / "run")


def run_two_ranks(combos: Sequence[Combo], ref_dir: Path, work: Path, per_combo_s: int = 180) -> dict[str, dict]:
    """Run `combos` on two ranks with matrix_driver.py (one torchrun for all of them; after a
    failure the driver stops and a fresh one continues with the rest, so that no combination
    runs in a process group that a failed one may have left out of step). Returns id -> result
    (status ok / refused / error, with the error and traceback tail, or `died` when the driver
    ended without reporting the combination it was on)."""
    results_file = work / "results.json"
    remaining = list(combos)
    results: dict[str, dict] = {}
    env = {**child_env(), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    launch = 0
    while remaining:
        launch += 1
        spec = work / f"spec{launch}.json"
        spec.write_text(json.dumps({
            "results": str(results_file), "run_root": str(work / "runs"),
            "combos": [{"id": c.id, "overrides": [*c.overrides(ref_dir), *TINY, RUN_NAME]} for c in remaining]}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(DRIVER), str(spec)]
        began = time.perf_counter()
        try:
            proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=120 + per_combo_s * len(remaining))
            tail, rc = proc.stderr[-3000:], proc.returncode
        except subprocess.TimeoutExpired as err:
            tail, rc = (err.stderr or b"")[-3000:], "timeout"
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        if results_file.exists():
            results.update(json.loads(results_file.read_text()))
        done = [c for c in remaining if c.id in results]
        remaining = [c for c in remaining if c.id not in results]
        if remaining and (not done or results[done[-1].id]["status"] != "error"):
            # the driver stops by itself only after reporting an error: otherwise the combination
            # it was on ended it (a crash, a hang past the timeout)
            results[remaining[0].id] = {"status": "died", "rc": rc, "seconds": time.perf_counter() - began,
                                        "error": f"driver ended (rc {rc}) without a result", "traceback": tail}
            remaining = remaining[1:]
    return results


@pytest.fixture(scope="module")
def two_rank_results(ref_dir, tmp_path_factory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("matrix_two_ranks")
    began = time.perf_counter()
    results = run_two_ranks(TWO_RANK_PAIRWISE, ref_dir, work)
    print(f"\ntwo ranks: {len(results)} combinations in {time.perf_counter() - began:.1f} s")
    return results


@pytest.mark.slow
@pytest.mark.parametrize("combo", TWO_RANK_PAIRWISE, ids=lambda c: c.id)
def test_pairwise_two_ranks_train_one_step(combo, two_rank_results):
    """Two ranks over gloo (stages 1-3): each combination of the pairwise set trains one step on
    both ranks (or is refused at config time, one line per problem)."""
    result = two_rank_results[combo.id]
    assert result["status"] in ("ok", "refused"), (
        f"{combo.id}: {result['status']}: {result.get('error')}\n{result.get('traceback', '')}")
    if result["status"] == "refused":
        assert all("\n" not in p for p in result["problems"]), result["problems"]
        assert expected_problems(combo), f"{combo.id} refused unexpectedly: {result['problems']}"


if __name__ == "__main__":
    json.dump(counts(), sys.stdout, indent=2)
    print()
