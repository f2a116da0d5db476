"""The benchmark on a very small setting, and the log-prob head microbenchmark's equality claim."""

from __future__ import annotations

import importlib.util
import json

import pytest

import sys
from pathlib import Path

from ppo_train.cli import compose
from ppo_train.data.layout import build_units
from ppo_train.model import load_tokenizer
from ppo_train.stats import comparable_examples, packing_cell

REPO_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_DIR / "scripts"))  # the benchmark is a tool of the repository, not the library
from bench import BenchOptions, _merge_overrides, group_by_units, run_grid  # noqa: E402
from bench_report import write_outputs  # noqa: E402

SMALL = ["model=tiny", "model.from_config.hidden_size=32", "model.from_config.intermediate_size=64",
         "model.from_config.num_attention_heads=4", "model.from_config.num_key_value_heads=2",
         "dataset.num_rows=14", "dataset.max_prompt_length=64", "dataset.max_response_length=32",
         "packing.row_tokens=512", "packing.rows_per_batch=2", "trainer.micro_batch_size=2"]
GRID = [("paired", "none"), ("shared", "ffd")]


@pytest.fixture(scope="module")
def result():
    opts = BenchOptions(grid=GRID, warmup_steps=1, units_per_step=4, num_units=12, repeats=1, subprocess=False,
                        trl=False)
    return run_grid(SMALL, opts, log=lambda *_: None)


def test_structure_and_throughput(result):
    points = result["points"]
    assert [(p["layout"], p["packer"]) for p in points] == GRID
    for p in points:
        assert p["units"] == 12, p  # every point trains the same prompts in its timed pass
        assert p["samples_per_s"] > 0 and p["real_tokens_per_s"] > 0 and p["seconds"] > 0, p
        assert p["steps"] >= 1 and p["warmup_steps"] == 1 and p["mask_s_per_step"] >= 0
        assert p["pass_seconds"] == [round(p["seconds"], 3)]
        assert p["peak_memory_mib"] is None or p["peak_memory_mib"] > 0
        assert p["last_step_loss"] == p["last_step_loss"], "non-finite loss"  # NaN != NaN
        assert p["ideal_prefix"] == (result["stats"]["ideal_speedup"] if p["layout"] == "shared" else 1.0)
    base = points[0]
    assert base["speedup"] == pytest.approx(1.0) and base["ideal_padded"] == pytest.approx(1.0)
    assert points[1]["ideal_padded"] == pytest.approx(base["total_tokens"] / points[1]["total_tokens"])
    assert result["trl"].get("skipped"), result["trl"]


def test_pad_fractions_equal_stats(result):
    cfg = compose([*SMALL, "run_name=test"])
    examples = comparable_examples(cfg, load_tokenizer(cfg.model))[0][:12]
    for p in result["points"]:
        cell = packing_cell(examples, cfg, p["layout"], p["packer"])
        assert (p["real_tokens"], p["total_tokens"]) == (cell["real_tokens"], cell["total_tokens"]), (p, cell)
        assert p["pad_fraction"] == pytest.approx(1.0 - cell["nonpad_fraction"], abs=1e-12)
    cells = {(c["layout"], c["packer"]): c for c in result["stats"]["packing"]}
    for p in result["points"]:
        assert p["total_tokens"] == cells[(p["layout"], p["packer"])]["total_tokens"]


def test_outputs_written(result, tmp_path):
    paths = write_outputs(result, tmp_path)
    assert json.loads((tmp_path / "bench.json").read_text())["points"][0]["layout"] == "paired"
    table = (tmp_path / "bench.md").read_text()
    assert "| paired+none |" in table and "| shared+ffd |" in table
    assert f"TRL DPOTrainer baseline: {result['trl']['skipped']}" in table
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "bench.png").stat().st_size > 1000, paths


def test_steps_cover_every_unit_once():
    from ppo_train.data.packing import plan_epoch

    cfg = compose([*SMALL, "run_name=test"])
    units = build_units(comparable_examples(cfg, load_tokenizer(cfg.model))[0], "shared")
    for packer in ("none", "ffd"):
        plan = plan_epoch(units, compose([*SMALL, f"packing={packer}", "run_name=t"]).packing, 2, 42, 0)
        steps = group_by_units(plan, 4)
        counts = [sum(len(mb.units) for mb in s) for s in steps]
        assert sorted(u for s in steps for mb in s for u in mb.units) == list(range(len(units)))
        assert all(c >= 4 for c in counts[:-1]), counts


def test_user_overrides_win():
    assert _merge_overrides(["model=tiny", "dataset.num_rows=160"], ["dataset.num_rows=8", "x.y=1"]) == [
        "model=tiny", "dataset.num_rows=8", "x.y=1"]


def _logit_memory():
    spec = importlib.util.spec_from_file_location("logit_memory", REPO_DIR / "scripts" / "logit_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chunked_head_equals_naive():
    """Chunked log-probs (chunk 128 over 512 tokens: several chunks, recomputed in the backward)
    equal full-logits log_softmax + gather, values and gradients, within 1e-5."""
    diffs = _logit_memory().compare_heads(tokens=512, vocab=5000, hidden=64, chunk=128, seed=0)
    assert max(diffs.values()) < 1e-5, diffs


def test_vision_language_points_count_encoder_images_and_calls(tmp_path):
    """--vlm: images through the vision encoder per timed pass are the prompts' images once in
    layout=shared and K (= 2) times in layout=paired; one encoder call per micro-batch; the
    Markdown table carries the image columns."""
    import ppo_train.data.sources as sources

    opts = BenchOptions(grid=GRID, warmup_steps=1, units_per_step=8, num_units=16, repeats=1, subprocess=False,
                        trl=False)
    result = run_grid(["recipe=tiny_vlm_dpo", "packing.rows_per_batch=2"], opts, log=lambda *_: None)
    cfg = compose(["recipe=tiny_vlm_dpo", "run_name=test"])
    images = sum(len(ex.images or ()) for ex in sources.load_examples(cfg.dataset)[0][:16])
    paired, shared = result["points"]
    assert shared["images"] == images and paired["images"] == 2 * images, (paired["images"], shared["images"], images)
    for p in (paired, shared):
        assert p["encoder_calls"] == p["micro_batches"], p
        assert p["image_tokens"] > 0 and p["tokens_per_step"] == p["total_tokens"] / p["steps"]
    write_outputs(result, tmp_path)
    assert "| config | tokens/step | encoder images | encoder calls |" in (tmp_path / "bench.md").read_text()


def test_vs_trl_report_lists_every_baseline(tmp_path):
    """The --vs-trl table: both pptrain rows, one row per TRL run with both pptrain rows' ratios
    against it; a missing or failed run is named, not dropped; a null MFU shows as such."""
    from bench_report import write_vs_trl

    result = {"torch": "x", "overrides": ["model=tiny"],
              "pptrain": {"pairs_per_s": 4.0, "mfu": None, "peak_rss_mib": 1000.0, "precision": "bf16",
                          "speedup_vs_trl_fp32": 8.0, "rss_vs_trl_fp32": 0.5},
              "pptrain_fp32": {"pairs_per_s": 3.0, "mfu": 0.4, "peak_rss_mib": 900.0, "precision": "fp32",
                               "speedup_vs_trl_fp32": 6.0, "rss_vs_trl_fp32": 0.45},
              "trl_fp32": {"pairs_per_s": 0.5, "mfu": 0.1, "peak_rss_mib": 2000.0},
              "trl_best": {"error": "boom"}}
    table = (Path(write_vs_trl(result, tmp_path)["markdown"])).read_text()
    assert "| pptrain defaults | bf16 | 4.00 | - | 1000 |  |  |" in table
    assert "| pptrain fp32 | fp32 | 3.00 | 40.0% | 900 |  |  |" in table
    assert "| TRL defaults in fp32 | fp32 | 0.50 | 10.0% | 2000 | 8.00x, 0.50x | 6.00x, 0.45x |" in table
    assert "| TRL defaults (bf16 mixed) | bf16 mixed | not run |" in table
    assert "| TRL bf16 mixed, precompute_ref_log_probs (its best) | bf16 mixed | boom |" in table


def test_vs_trl_rounds_take_turns_and_the_fastest_round_counts(monkeypatch):
    """--rounds N: both pptrain rows and each TRL run take turns N times; each configuration
    reports its fastest round (with every round's pairs/s and the highest peak RSS), the ratios
    come from those, and a round that failed does not hide one that ran."""
    import bench
    import bench_trl

    order, speeds = [], {"pptrain": [5.0, 6.0], "pptrain_fp32": [4.0, 3.0], "trl_own_defaults": [0.5, 0.4],
                         "trl_fp32": [None, 0.6], "trl_fp32_precompute": [None, None], "trl_best": [0.75, 0.7]}

    def fake(name):
        k = sum(1 for o in order if o == name)
        order.append(name)
        v = speeds[name][k]
        return {"pairs_per_s": v, "peak_rss_mib": 1000.0 + k, "round": k} if v else {"error": f"{name} failed"}

    monkeypatch.setattr(bench_trl, "pptrain_default", lambda overrides, steps: fake(
        "pptrain_fp32" if "trainer.precision=fp32" in overrides else "pptrain"))
    monkeypatch.setattr(bench, "_trl", lambda overrides, opts, precompute, bf16: fake(
        {(False, True): "trl_own_defaults", (False, False): "trl_fp32", (True, False): "trl_fp32_precompute",
         (True, True): "trl_best"}[(precompute, bf16)]))
    result = bench.vs_trl(["model=tiny"], bench.BenchOptions(), 8, rounds=2, log=lambda *a: None)
    assert order == ["pptrain", "pptrain_fp32", "trl_own_defaults", "trl_fp32", "trl_fp32_precompute", "trl_best"] * 2
    ours = result["pptrain"]
    assert ours["pairs_per_s"] == 6.0 and ours["round"] == 1 and ours["pairs_per_s_rounds"] == [5.0, 6.0]
    assert ours["peak_rss_mib"] == 1001.0 and result["rounds"] == 2
    assert result["trl_own_defaults"]["pairs_per_s"] == 0.5 and result["trl_own_defaults"]["peak_rss_mib"] == 1001.0
    assert abs(ours["speedup_vs_trl_own_defaults"] - 12.0) < 1e-12 and abs(ours["speedup_vs_trl_fp32"] - 10.0) < 1e-12
    assert abs(ours["speedup_vs_trl_best"] - 8.0) < 1e-12 and abs(ours["rss_vs_trl_best"] - 1.0) < 1e-12
    assert result["trl_fp32"]["pairs_per_s_rounds"] == [None, 0.6]
    assert result["trl_fp32_precompute"] == {"error": "trl_fp32_precompute failed"}
    assert "speedup_vs_trl_fp32_precompute" not in ours
    fp32 = result["pptrain_fp32"]
    assert fp32["pairs_per_s"] == 4.0 and abs(fp32["speedup_vs_trl_own_defaults"] - 8.0) < 1e-12


def test_a_grid_point_may_pin_its_attention_backend(monkeypatch):
    """`--grid paired:none:sdpa,shared:ffd:flex` (gpu_check's grid): each point trains with its
    own model.attention; a point without a third field keeps the overrides' setting."""
    import bench

    seen = []

    def fake_point(overrides, layout, packer, opts):
        seen.append((layout, packer, [o for o in overrides if o.startswith("model.attention=")]))
        return {"layout": layout, "packer": packer, "samples_per_s": 1.0, "seconds": 1.0, "total_tokens": 1}

    monkeypatch.setattr(bench, "run_point", fake_point)
    monkeypatch.setattr(bench, "_trl", lambda *a, **k: None)
    opts = BenchOptions(grid=[("paired", "none", "sdpa"), ("shared", "ffd", "flex"), ("shared", "none")],
                        num_units=4, subprocess=False, trl=False)
    run_grid(SMALL, opts, log=lambda *_: None)
    assert seen == [("paired", "none", ["model.attention=sdpa"]), ("shared", "ffd", ["model.attention=flex"]),
                    ("shared", "none", [])]


def test_a_model_and_a_scorer_of_different_backends_are_refused_by_name():
    """The benchmark built its model for the CPU and its Scorer for CUDA: flex's BlockMask reached
    SDPA ("attn_mask must be Tensor, not BlockMask"). Forced here on the CPU (flex forwards
    without grad run on the CPU): the pairing is named instead."""
    import torch

    from ppo_train.errors import ModelLoadError
    from ppo_train.scoring import PolicyModule, Scorer
    from tests.conftest import random_examples, tiny_model

    units = build_units(random_examples(2, 2), "shared")
    module = PolicyModule(tiny_model("llama", attn="pptrain_sdpa"))
    with torch.no_grad(), pytest.raises(ModelLoadError, match="the model's attention is 'pptrain_sdpa' but the batch "
                                                               "carries a FlexAttention BlockMask"):
        Scorer(units, 0, "flex")(module, None)
