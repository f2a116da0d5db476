"""The tokenized store (ppo_train/data/store.py) against the in-process path it replaces.

- Every bundled format, text and images (every layout for the transcripts and the M-RoPE image
  rows, layout=shared for the others): the units read from the store equal
  the units of the in-process path (load_examples -> tokenize_examples -> build_units) field by
  field, dtypes included; so do the reports; every packer plans the same micro-batches and
  collates the same tensors from both.
- A second start reads the store; a changed tokenizer, chat template, length limit, file or
  image builds a new one, a setting that does not change tokens does not.
- A damaged store (a truncated shard, a shard Arrow cannot read, a missing shard, a torn
  meta.json) is rebuilt with a warning, never read as data.
- Two processes build one store as one; two gloo ranks build it once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from ppo_train.cli import compose
from ppo_train.data import store as store_module
from ppo_train.data.collate import collate
from ppo_train.data.layout import build_units
from ppo_train.data.packing import plan_epoch
from ppo_train.data.sources import load_examples
from ppo_train.data.store import open_store
from ppo_train.data.tokenize import tokenize_examples
from ppo_train.dist import DistInfo, free_port
from ppo_train.errors import DataError
from ppo_train.inputs import prepare
from ppo_train.model import image_inputs, load_tokenizer, load_vision

UNIT_FIELDS = ("uid", "input_ids", "position_ids", "segment_ids", "doc_ids", "resp_start", "resp_len",
               "resp_pred_first", "pairs", "mrope", "image_tokens")
DATASETS = {
    "hh_rlhf": [],
    "ultrafeedback_scored": ["recipe=tiny_uf_simpo"],
    "llamafactory_sharegpt": ["recipe=tiny_lf_orpo"],
    "pandalm_ties": ["recipe=tiny_pandalm_rm"],
    "images_llava": ["recipe=tiny_vlm_dpo"],
    "images_qwen2_vl_ranked": ["dataset=vision_ranked", "model=tiny_qwen2_vl"],
}


def _cfg(cache: Path, *overrides: str):
    return compose([f"dataset.cache_dir={cache}", "dataset.eval_fraction=0", "packing=none", *overrides])


def _same_unit(a, b, where):
    for name in UNIT_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, (where, name)
            continue
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and np.array_equal(x, y), (where, name, x, y)
    assert a.doc_bounds == b.doc_bounds, where
    assert [(lo, list(r)) for lo, r in a.images] == [(lo, list(r)) for lo, r in b.images], where


def _same_batch(a, b, where):
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, torch.Tensor):
            assert value.dtype == other.dtype and torch.equal(value, other), (where, name)
        elif isinstance(value, dict):
            assert value.keys() == other.keys() and all(torch.equal(value[k], other[k]) for k in value), (where, name)
        else:
            assert value == other, (where, name)


@pytest.mark.parametrize("name", list(DATASETS))
def test_the_store_gives_the_in_process_units_reports_and_batches(name, tmp_path):
    base = DATASETS[name]
    tok = load_tokenizer(_cfg(tmp_path, *base).model)
    vision = load_vision(_cfg(tmp_path, *base).model, tok)
    # every layout where positions differ most (transcripts; M-RoPE images), shared elsewhere
    layouts = {"hh_rlhf": ("shared", "paired", "unmasked"), "images_qwen2_vl_ranked": ("shared", "paired")}.get(
        name, ("shared",))
    for layout in layouts:
        cfg = _cfg(tmp_path, *base, f"layout={layout}")
        data = prepare(cfg, tok)
        rows, load_report = load_examples(cfg.dataset)
        tokenized, token_report = tokenize_examples(rows, tok, cfg.dataset, vision=vision)
        plain = build_units(tokenized, layout)
        assert len(plain) == len(data.units) > 0
        for i in range(len(plain)):
            _same_unit(plain[i], data.units[i], (name, layout, i))
        assert np.array_equal(plain.lengths, data.units.lengths)
        # the per-example preferred-token counts (sft in a DPO mix) from the store's columns alone
        assert np.array_equal(data.units.examples.chosen_tokens, plain.examples.chosen_tokens), (name, layout)
        assert plain.examples.chosen_tokens.tolist() == [sum(len(ex.response_ids[w]) for w, _ in ex.pairs)
                                                          for ex in tokenized]
        assert vars(load_report) == vars(data.load_report)
        assert vars(token_report) == vars(data.tokenize_report)
        assert data.examples.index.tolist() == [ex.index for ex in tokenized]
        images = image_inputs(vision)
        for packer in ("none", "sorted", "ffd"):
            packing = compose([f"packing={packer}", "packing.row_tokens=4096", "packing.rows_per_batch=3"]).packing
            mine, theirs = (plan_epoch(u, packing, 3, seed=5, epoch=1) for u in (data.units, plain))
            assert [(mb.rows, mb.units, mb.row_length) for mb in mine] == \
                   [(mb.rows, mb.units, mb.row_length) for mb in theirs], (name, layout, packer)
            for mb in mine[:2] + mine[-1:]:
                _same_batch(collate(data.units, mb, 0, images=images), collate(plain, mb, 0, images=images),
                            (name, layout, packer))


def test_a_second_start_reads_the_store(tmp_path):
    cfg = _cfg(tmp_path)
    tok = load_tokenizer(cfg.model)
    first, second = prepare(cfg, tok), prepare(_cfg(tmp_path), tok)
    assert [s.built for s in first.stores] == [True] and [s.built for s in second.stores] == [False]
    assert first.report()["stores_built"] == 1 and second.report()["stores_built"] == 0
    assert first.units.digest() == second.units.digest()
    assert first.stores[0].folder == second.stores[0].folder and first.stores[0].folder.parent == tmp_path
    assert {**first.report(), "stores_built": 0, "prepare_seconds": 0} == \
           {**second.report(), "stores_built": 0, "prepare_seconds": 0}


def test_the_default_location_is_the_datasets_cache():
    import datasets

    assert store_module.cache_root(None) == Path(datasets.config.HF_DATASETS_CACHE) / "pptrain"


def _store(cfg, tok=None):
    tok = tok or load_tokenizer(cfg.model)
    return open_store(cfg.dataset, cfg.dataset.path, tok)


@pytest.mark.parametrize("override", ["dataset.max_prompt_length=64", "dataset.max_response_length=32",
                                      "dataset.length_policy=drop", "dataset.num_rows=100",
                                      "dataset.max_image_pixels=1000", "dataset.response_marker=Assistant:"])
def test_a_setting_that_changes_tokens_builds_a_new_store(tmp_path, override):
    cfg = _cfg(tmp_path, "dataset.on_invalid=skip")
    tok = load_tokenizer(cfg.model)
    before = _store(cfg, tok)
    after = _store(_cfg(tmp_path, "dataset.on_invalid=skip", override), tok)
    assert after.built and after.folder != before.folder and before.folder.exists()


@pytest.mark.parametrize("override", ["dataset.eval_fraction=0.2", "dataset.num_proc=1", "layout=paired",
                                      "packing=ffd", "trainer.seed=3"])
def test_a_setting_that_does_not_change_tokens_reads_the_same_store(tmp_path, override):
    cfg = _cfg(tmp_path)
    tok = load_tokenizer(cfg.model)
    before = _store(cfg, tok)
    after = _store(_cfg(tmp_path, override), tok)
    assert before.built and not after.built and after.folder == before.folder


def test_another_tokenizer_or_chat_template_builds_a_new_store(tmp_path):
    cfg = _cfg(tmp_path)
    tok = load_tokenizer(cfg.model)
    before = _store(cfg, tok)
    tok.chat_template = tok.chat_template + "{# edited #}"
    template = _store(cfg, tok)
    tok = load_tokenizer(cfg.model)
    tok.add_tokens(["<new_word>"])
    vocabulary = _store(cfg, tok)
    again = _store(cfg, load_tokenizer(cfg.model))
    assert template.built and vocabulary.built and not again.built
    assert len({before.folder, template.folder, vocabulary.folder}) == 3 and again.folder == before.folder


def test_a_changed_file_builds_a_new_store_and_nothing_stale_is_read(tmp_path):
    src = Path(compose([]).dataset.path)
    path = tmp_path / "d.jsonl"
    lines = src.read_text().splitlines()[:30]
    path.write_text("\n".join(lines) + "\n")
    cfg = _cfg(tmp_path / "cache", f"dataset.path={path}")
    tok = load_tokenizer(cfg.model)
    before = prepare(cfg, tok)
    row = json.loads(lines[3])
    row["chosen"] = row["chosen"] + " And one more sentence."
    path.write_text("\n".join(lines[:3] + [json.dumps(row)] + lines[4:]) + "\n")
    after = prepare(_cfg(tmp_path / "cache", f"dataset.path={path}"), tok)
    assert after.stores[0].built and after.stores[0].folder != before.stores[0].folder
    assert len(after.units[3].input_ids) > len(before.units[3].input_ids)
    assert after.units.digest() != before.units.digest()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing", "meta"])
def test_a_damaged_store_is_rebuilt_with_a_warning(tmp_path, capfd, damage):
    cfg = _cfg(tmp_path)
    tok = load_tokenizer(cfg.model)
    good = prepare(cfg, tok)
    folder, digest = good.stores[0].folder, good.units.digest()
    expected = [good.units[i] for i in (0, len(good.units) - 1)]
    del good  # its memory map would see the file change under it (damage in place is not what a crash does)
    shard = sorted(folder.glob("*.arrow"))[0]
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "garbage":  # same size, so only Arrow can tell
        shard.write_bytes(os.urandom(shard.stat().st_size))
    elif damage == "missing":
        shard.unlink()
    else:
        (folder / "meta.json").write_text('{"key": ')
    capfd.readouterr()
    again = prepare(_cfg(tmp_path), tok)
    err = capfd.readouterr().err
    assert f"the tokenized store {folder} is damaged" in err and "building it again" in err, err
    assert again.stores[0].built and again.units.digest() == digest
    for unit, i in zip(expected, (0, len(again.units) - 1)):
        _same_unit(unit, again.units[i], i)


def test_two_processes_build_the_same_store_as_one(tmp_path, monkeypatch):
    """num_proc=2 (forced on 598 rows): the same contents, digest and units as one process."""
    monkeypatch.setattr(store_module, "ROWS_PER_PROCESS", 100)
    one = prepare(_cfg(tmp_path / "one", "dataset.num_proc=1"), load_tokenizer(compose([]).model))
    two = prepare(_cfg(tmp_path / "two", "dataset.num_proc=2"), load_tokenizer(compose([]).model))
    assert one.stores[0].meta["processes"] == 1 and two.stores[0].meta["processes"] == 2
    assert len(list(two.stores[0].folder.glob("*.arrow"))) == 2
    assert one.stores[0].meta["digest"] == two.stores[0].meta["digest"]
    assert one.units.digest() == two.units.digest() and vars(one.tokenize_report) == vars(two.tokenize_report)
    for i in range(0, len(one.units), 37):
        _same_unit(one.units[i], two.units[i], i)


def test_an_invalid_row_in_a_worker_names_the_file_and_row(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "ROWS_PER_PROCESS", 10)
    src = Path(compose([]).dataset.path)
    lines = src.read_text().splitlines()[:40]
    lines[33] = json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": ""})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = _cfg(tmp_path / "cache", f"dataset.path={path}", "dataset.num_proc=2", "dataset.on_invalid=error")
    with pytest.raises(DataError, match=rf"{path} row 33.rejected: empty text .*on_invalid=skip"):
        prepare(cfg, load_tokenizer(cfg.model))
    assert not list((tmp_path / "cache").glob("*/meta.json"))  # nothing half-built is left to read
    skipped = prepare(_cfg(tmp_path / "cache", f"dataset.path={path}", "dataset.num_proc=2",
                           "dataset.on_invalid=skip"), load_tokenizer(cfg.model))
    assert skipped.load_report.skipped == 1 and skipped.load_report.skip_messages[0].startswith(f"{path} row 33.")
    assert 33 not in skipped.examples.index.tolist() and len(skipped.examples) == 39


def test_a_changed_image_builds_a_new_store(tmp_path, capfd):
    from PIL import Image

    from tests.unit.test_vision_data import CAT, row, write_jsonl

    Image.open(CAT).save(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "d.jsonl", [row(["a.png"]), row([CAT])])
    cfg = _cfg(tmp_path / "cache", "dataset=vision_pairs", "model=tiny_qwen2_vl", f"dataset.path={path}")
    tok = load_tokenizer(cfg.model)
    before = prepare(cfg, tok)
    Image.open(CAT).resize((64, 48)).save(tmp_path / "a.png")  # another size: other image tokens
    capfd.readouterr()
    after = prepare(_cfg(tmp_path / "cache", "dataset=vision_pairs", "model=tiny_qwen2_vl", f"dataset.path={path}"), tok)
    assert "the images of the tokenized store" in capfd.readouterr().err
    assert after.stores[0].built
    assert after.examples.image_tokens[0] != before.examples.image_tokens[0]


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    info = DistInfo(rank, 2, rank, torch.device("cpu"))
    cfg = _cfg(Path(out) / "cache")
    data = prepare(cfg, load_tokenizer(cfg.model), info)
    torch.save({"built": data.stores[0].built, "digest": data.units.digest(), "n": len(data.units)},
               f"{out}/rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_two_ranks_build_the_store_once(tmp_path):
    mp.start_processes(_rank, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [g["built"] for g in got] == [True, False]
    assert got[0]["digest"] == got[1]["digest"] and got[0]["n"] == got[1]["n"] == 598
    assert len(list((tmp_path / "cache").glob("*/meta.json"))) == 1


def test_the_data_layer_imports_nothing_above_it():
    """ppo_train/data/ is given the tokenizer, processor, device type and process turns; it
    imports nothing from the package outside data/ but errors and fileio."""
    import ast

    allowed = {"ppo_train", "ppo_train.errors", "ppo_train.fileio"}
    found = {}
    for path in sorted((Path(__file__).resolve().parents[2] / "ppo_train" / "data").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module == "ppo_train":
                names = [f"ppo_train.{a.name}" for a in node.names]
            bad = [n for n in names if n.startswith("ppo_train") and not n.startswith("ppo_train.data")
                   and n not in allowed]
            if bad:
                found.setdefault(path.name, []).extend(bad)
    assert found == {}, found
