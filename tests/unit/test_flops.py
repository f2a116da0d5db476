"""Model FLOPs: visible attention pairs equal the count of True entries of the dense mask among
real tokens, for every layout and packer; the body's matmul FLOPs equal what torch's own
FlopCounterMode counts for a forward; the head and attention terms follow their formulas."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from ppo_train.data.collate import collate
from ppo_train.data.layout import build_units
from ppo_train.data.packing import plan_epoch
from ppo_train.data.tokenize import TokenizedExample
from ppo_train.flops import FlopCounter, ModelShape, calibrate_peak
from ppo_train.masks import dense_mask
from tests.conftest import random_examples, tiny_model


def test_visible_pairs_by_hand():
    """Prompt 3, responses 2 and 1. Shared: the prompt 3*4/2 = 6, response 1: 2*3 + 2*3/2 = 9,
    response 2: 1*3 + 1 = 4, total 19. Paired: [P|R1] 5*6/2 = 15 and [P|R2] 4*5/2 = 10, total 25."""
    ex = TokenizedExample(0, [1, 2, 3], [[4, 5], [6]], [(0, 1)])
    assert build_units([ex], "shared")[0].visible_pairs() == 19
    assert build_units([ex], "paired")[0].visible_pairs() == 25


@pytest.mark.parametrize("layout, packer", [(lay, pk) for lay in ("shared", "paired") for pk in ("none", "sorted", "ffd")]
                         + [("unmasked", "ffd")])  # layout=unmasked packs with ffd only
def test_visible_pairs_equal_the_dense_mask(layout, packer):
    units = build_units(random_examples(9, 3, seed=4), layout)
    cfg = OmegaConf.create({"name": packer, "row_tokens": 512, "rows_per_batch": 2, "pad_multiple": 128})
    for mb in plan_epoch(units, cfg, 3, seed=1, epoch=0):
        batch = collate(units, mb, 0, mask_documents=layout != "unmasked")
        mask = dense_mask(batch.doc_ids, batch.segment_ids)[:, 0]
        real = torch.zeros_like(batch.input_ids, dtype=torch.bool)
        for r, row in enumerate(mb.rows):
            real[r, :sum(p.hi - p.lo for p in row)] = True
        counted = int((mask & real[:, :, None] & real[:, None, :]).sum())
        assert batch.visible_pairs == counted, (layout, packer, batch.visible_pairs, counted)


def test_body_flops_equal_torchs_counter():
    model = tiny_model("llama", vocab=97).eval()
    shape = ModelShape.of(model)
    tokens = 37
    ids = torch.randint(0, 97, (1, tokens))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.model(input_ids=ids)
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(v for op, v in counts.items() if "mm" in str(op) or "addmm" in str(op))
    assert matmuls == 2 * shape.body_elements * tokens, (matmuls, shape)
    c = model.config
    assert shape.body_elements == c.num_hidden_layers * (
        2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * (c.num_key_value_heads * c.hidden_size // c.num_attention_heads)
        + 3 * c.hidden_size * c.intermediate_size)


def test_step_flops_formula():
    shape = ModelShape(body_elements=1000, hidden=8, vocab=50, layers=2, attention_width=8)
    # forward: body 2*1000*10 + attention 4*2*8*30 + head 2*8*50*4
    assert shape.forward_flops(10, 30, 4, 2) == 20000 + 1920 + 3200
    reward = ModelShape(1000, 8, 50, 2, 8, reward=True)
    assert reward.forward_flops(10, 30, 4, 2) == 20000 + 1920 + 2 * 8 * 2
    assert FlopCounter(shape).passes == 3.0


def test_peak_calibration_is_a_positive_rate():
    assert calibrate_peak(torch.device("cpu"), torch.float32, seconds=0.05) > 1e8


def test_spec_sheet_peaks_by_device_name_and_precision():
    from ppo_train.flops import table_peak

    assert table_peak("NVIDIA H100 80GB HBM3", torch.bfloat16, tf32=False) == 989.4e12
    assert table_peak("NVIDIA H100 PCIe", torch.bfloat16, tf32=False) == 756.0e12
    assert table_peak("NVIDIA H100 80GB HBM3", torch.float32, tf32=True) == 494.7e12
    assert table_peak("NVIDIA A100-SXM4-80GB", torch.float32, tf32=False) == 19.5e12
    assert table_peak("NVIDIA L40S", torch.bfloat16, tf32=False) == 362.05e12  # not the L4's
    assert table_peak("NVIDIA A10G", torch.bfloat16, tf32=False) is None  # no published figure: calibrate
    assert table_peak("Some Future GPU", torch.bfloat16, tf32=False) is None


def test_the_peak_is_the_best_this_machine_recorded(tmp_path):
    """A calibration under load (low) does not lower the peak below the recorded one; a higher
    one raises the record; an unreadable record is ignored."""
    from ppo_train.flops import recorded_peak

    path = tmp_path / "peaks.json"
    assert recorded_peak(5e11, "cpu|x|bf16", path) == 5e11
    assert recorded_peak(2e11, "cpu|x|bf16", path) == 5e11  # a busy start-up keeps the unloaded peak
    assert recorded_peak(7e11, "cpu|x|bf16", path) == 7e11
    assert recorded_peak(1e11, "cpu|x|fp32", path) == 1e11  # another dtype is another record
    assert recorded_peak(3e11, "cpu|x|bf16", path) == 7e11
    path.write_text("not json")
    assert recorded_peak(3e11, "cpu|x|bf16", path) == 3e11


def test_mfu_above_one_is_reported_as_null_with_a_reason(capsys):
    """A step faster than the peak proves the peak wrong: mfu is null from then on (FLOP/s kept),
    and one line on stderr says why."""
    from ppo_train.flops import Utilization

    util = Utilization(FlopCounter(ModelShape(1, 1, 1, 1, 1)), peak=1e9)
    assert util.row(5e8, 1.0, 1)["mfu"] == 0.5
    row = util.row(3e9, 1.0, 1)
    assert row["mfu"] is None and row["flops_per_s"] == 3e9
    assert util.row(5e8, 1.0, 1)["mfu"] is None  # the rest of the run
    err = capsys.readouterr().err
    assert err.count("mfu is null") == 1 and "exceed the calibrated peak" in err
    assert util.row(1.5e9, 1.0, 2)["mfu"] is None
    quiet = Utilization(FlopCounter(ModelShape(1, 1, 1, 1, 1)), peak=1e9, announce=False)
    assert quiet.row(3e9, 1.0, 1)["mfu"] is None and capsys.readouterr().err == ""
    assert Utilization(FlopCounter(ModelShape(1, 1, 1, 1, 1)), peak=1e9).row(1.5e9, 1.0, 2)["mfu"] == 0.75
