"""Image rows: accepted kinds (paths, bytes, a datasets Image column), bad images and bad rows
named by file, row and field (or skipped and counted), the length policy for image prompts,
and the collate order of images in a packed batch."""

from __future__ import annotations

import io
import json

import pytest
from omegaconf import OmegaConf
from PIL import Image

from ppo_train.cli import compose
from ppo_train.data.layout import build_units
from ppo_train.data.sources import load_examples
from ppo_train.data.tokenize import tokenize_examples
from ppo_train.errors import DataError
from ppo_train.fileio import asset_path
from ppo_train.model import load_tokenizer, load_vision

CAT = str(asset_path("vision/images/chelsea.jpg"))


def dataset_cfg(path, **kw):
    """The dataset group's defaults (DatasetConfig) with `kw` on top."""
    from ppo_train.config import DatasetConfig

    base = {"path": str(path), "max_response_length": 64}
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), {**base, **kw})


def row(images, parts=None, answer="A cat."):
    parts = parts if parts is not None else [{"type": "image"} for _ in images] + [{"type": "text", "text": "What?"}]
    return {"images": images, "prompt": [{"role": "user", "content": parts}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A dog."}]}]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_relative_paths_are_read_from_the_data_files_folder(tmp_path):
    (tmp_path / "pics").mkdir()
    Image.open(CAT).save(tmp_path / "pics" / "cat.png")
    path = write_jsonl(tmp_path / "d.jsonl", [row(["pics/cat.png"]), row([CAT, "pics/cat.png"])])
    examples, _ = load_examples(dataset_cfg(path))
    assert examples[0].images == [str(tmp_path / "pics" / "cat.png")]
    assert len(examples[1].images) == 2


@pytest.mark.parametrize("bad, message", [
    ("missing.jpg", r"images\[0\]: image file"),
    ("not_an_image.txt", "cannot decode the image"),
])
def test_bad_images_are_named_or_skipped_and_counted(tmp_path, bad, message):
    (tmp_path / "not_an_image.txt").write_text("hello")
    path = write_jsonl(tmp_path / "d.jsonl", [row([CAT]), row([bad]), row([CAT])])
    with pytest.raises(DataError, match=rf"d.jsonl row 1.*{message}"):
        load_examples(dataset_cfg(path))
    examples, report = load_examples(dataset_cfg(path, on_invalid="skip"))
    assert [e.index for e in examples] == [0, 2] and report.skipped == 1
    assert message.replace("\\", "") in report.skip_messages[0]


def test_an_image_without_pixels_is_invalid():
    from ppo_train.vision import image_ref

    with pytest.raises(DataError, match="no pixels"):
        image_ref(Image.new("RGB", (0, 0)), "row 3.images[0]", None)


@pytest.mark.parametrize("images, parts, message", [
    ([CAT, CAT], [{"type": "image"}, {"type": "text", "text": "What?"}], "2 image\\(s\\) in 'images' but 1 image part"),
    ([], [{"type": "image"}, {"type": "text", "text": "What?"}], "0 image\\(s\\) in 'images' but 1 image part"),
    ([CAT], [{"type": "video"}], "expected \\{'type': 'text'"),
])
def test_rows_whose_images_and_parts_disagree_are_refused(tmp_path, images, parts, message):
    path = write_jsonl(tmp_path / "d.jsonl", [row(images, parts)])
    with pytest.raises(DataError, match=message):
        load_examples(dataset_cfg(path))


def test_an_image_in_a_response_is_refused(tmp_path):
    bad = row([CAT])
    bad["chosen"][0]["content"] = [{"type": "image"}, {"type": "text", "text": "x"}]
    with pytest.raises(DataError, match="response 0 holds an image part"):
        load_examples(dataset_cfg(write_jsonl(tmp_path / "d.jsonl", [bad])))


def test_image_bytes_in_a_parquet_column_load(tmp_path):
    import datasets

    buf = io.BytesIO()
    Image.open(CAT).save(buf, format="PNG")
    rows = [row([{"bytes": buf.getvalue(), "path": None}])]
    features = datasets.Features({"images": datasets.Sequence(datasets.Image()),
                                  **{k: v for k, v in datasets.Dataset.from_list(
                                      [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
                                  ).features.items()}})
    ds = datasets.Dataset.from_list(rows, features=features)
    ds.to_parquet(tmp_path / "d.parquet")
    examples, _ = load_examples(dataset_cfg(tmp_path / "d.parquet"))
    assert isinstance(examples[0].images[0], Image.Image) and examples[0].images[0].size == Image.open(CAT).size


def test_text_parts_without_images_become_a_string_for_text_models(tmp_path):
    cfg = compose(["model=tiny"])
    path = write_jsonl(tmp_path / "d.jsonl", [row([], [{"type": "text", "text": "Hello "}, {"type": "text",
                                                                                         "text": "there"}])])
    examples, _ = load_examples(dataset_cfg(path))
    assert examples[0].prompt[0]["content"] == "Hello there" and examples[0].images is None
    tokenize_examples(examples, load_tokenizer(cfg.model), dataset_cfg(path))


def test_image_rows_need_a_vision_language_model(tmp_path):
    cfg = compose(["model=tiny"])
    path = write_jsonl(tmp_path / "d.jsonl", [row([CAT])])
    examples, _ = load_examples(dataset_cfg(path))
    with pytest.raises(DataError, match="row 0: the row has images, and the model is a text model"):
        tokenize_examples(examples, load_tokenizer(cfg.model), dataset_cfg(path))


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
def test_image_prompts_are_dropped_not_truncated_and_the_placeholder_is_a_special_token(tmp_path, arch):
    cfg = compose([f"model=tiny_{arch}"])
    tok = load_tokenizer(cfg.model)
    vision = load_vision(cfg.model, tok)
    path = write_jsonl(tmp_path / "d.jsonl", [row([CAT], answer="word " * 100), row([CAT, CAT])])
    examples, _ = load_examples(dataset_cfg(path))
    full, _ = tokenize_examples(examples, tok, dataset_cfg(path, max_response_length=1000), vision=vision)
    one, two = (len(ex.prompt_ids) for ex in full)
    assert two > one and full[1].image_tokens == 2 * full[0].image_tokens > 0
    out, report = tokenize_examples(examples, tok, dataset_cfg(path, max_prompt_length=one), vision=vision)
    assert [ex.index for ex in out] == [0] and report.dropped_too_long == 1 and report.truncated_prompts == 0
    assert report.truncated_responses == 1 and len(out[0].response_ids[0]) == 64
    placeholder = vision.processor.image_token
    bad = write_jsonl(tmp_path / "bad.jsonl", [row([CAT], [{"type": "image"}, {"type": "text", "text": placeholder}])])
    with pytest.raises(DataError, match="special token"):
        tokenize_examples(load_examples(dataset_cfg(bad))[0], tok, dataset_cfg(bad), vision=vision)


def test_an_image_the_processor_cannot_take_is_an_invalid_row(tmp_path):
    """Qwen2-VL's resize refuses aspect ratios over 200 (a 1x400 strip): a DataError naming the file,
    row and size, or a skipped row counted as rows_with_unusable_images."""
    cfg = compose(["model=tiny_qwen2_vl"])
    tok = load_tokenizer(cfg.model)
    vision = load_vision(cfg.model, tok)
    Image.new("RGB", (1, 400), "red").save(tmp_path / "strip.png")
    path = write_jsonl(tmp_path / "d.jsonl", [row([CAT]), row(["strip.png"]), row([CAT])])
    examples, _ = load_examples(dataset_cfg(path))
    with pytest.raises(DataError, match=r"d.jsonl row 1: .*cannot take the image.*1x400.*on_invalid=skip"):
        tokenize_examples(examples, tok, dataset_cfg(path), vision=vision)
    out, report = tokenize_examples(examples, tok, dataset_cfg(path, on_invalid="skip"), vision=vision)
    assert [ex.index for ex in out] == [0, 2]
    assert report.image_rows == 1 and report.as_dict()["rows_with_unusable_images"] == 1
    assert report.skip_messages[0].startswith(f"{path} row 1: ")


def test_images_over_the_pixel_limit_are_invalid_rows_and_the_limit_is_configurable(tmp_path):
    """dataset.max_image_pixels is PIL's decompression-bomb limit: over it (PIL warns) and over
    twice it (PIL raises) are both invalid rows naming the key; null lifts the limit."""
    from PIL import Image as PILImage

    for side in (40, 50, 70):  # 1600, 2500 and 4900 pixels against a limit of 2000
        PILImage.new("RGB", (side, side), "blue").save(tmp_path / f"{side}.png")
    path = write_jsonl(tmp_path / "d.jsonl", [row(["40.png"]), row(["50.png"]), row(["70.png"])])
    try:
        with pytest.raises(DataError, match=r"d.jsonl row 1.images\[0\]: .*more pixels than "
                                            r"dataset.max_image_pixels=2000"):
            load_examples(dataset_cfg(path, max_image_pixels=2000))
        examples, report = load_examples(dataset_cfg(path, max_image_pixels=2000, on_invalid="skip"))
        assert [ex.index for ex in examples] == [0] and report.skipped == 2
        assert all("max_image_pixels" in m for m in report.skip_messages)
        assert len(load_examples(dataset_cfg(path, max_image_pixels=None))[0]) == 3
    finally:
        load_examples(dataset_cfg(path))  # the default limit again for the rest of the process
    assert PILImage.MAX_IMAGE_PIXELS == 89_478_485


def test_a_non_positive_pixel_limit_is_refused_at_config_time():
    from ppo_train.config_check import validate
    from ppo_train.errors import ConfigError

    with pytest.raises(ConfigError, match=r"dataset.max_image_pixels=0: expected a positive integer or null"):
        validate(compose(["dataset.max_image_pixels=0"]))


@pytest.mark.parametrize("url", ["http://example.com/cat.jpg", "https://example.com/a/b.png", "s3://bucket/cat.jpg"])
def test_an_image_url_is_refused_as_a_url(tmp_path, url):
    path = write_jsonl(tmp_path / "d.jsonl", [row([url])])
    with pytest.raises(DataError, match=rf"d.jsonl row 0.images\[0\]: '{url}' is a URL; images are not "
                                        "downloaded"):
        load_examples(dataset_cfg(path))


def test_a_packed_batch_lists_its_images_in_token_order():
    """The images of a micro-batch follow the order of their placeholder tokens in the flattened
    rows (the order the model scatters features in): shared once per prompt, paired per copy."""
    from ppo_train.data.collate import collate
    from ppo_train.data.packing import MicroBatch, Piece
    from tests.conftest import random_examples

    examples = random_examples(3, 2, seed=1)
    for ex, refs in zip(examples, (["a"], ["b", "c"], ["d"])):
        ex.images = refs
    seen = []
    for layout, want in (("shared", ["b", "c", "a", "d"]), ("paired", ["b", "c", "b", "c", "a", "a", "d", "d"])):
        units = build_units(examples, layout)
        rows = [[Piece(1, 0, units[1].length), Piece(0, 0, units[0].length)], [Piece(2, 0, units[2].length)]]
        length = max(sum(p.hi - p.lo for p in r) for r in rows)
        mb = MicroBatch(rows=rows, row_length=length, units=[1, 0, 2])
        batch = collate(units, mb, 0, images=lambda refs: seen.append(list(refs)) or {})
        assert seen[-1] == want and batch.images == len(want), (layout, seen[-1])


@pytest.mark.parametrize("model,trainable_outside_lm", [("tiny_llava", True), ("tiny_qwen2_vl", False)])
def test_zero_stage_rules_for_vision_language_models_across_ranks(model, trainable_outside_lm):
    """auto -> ZeRO-1 across ranks (parameter-order reduction), 3 and offload_params refused,
    explicit 2 only when nothing outside the language model trains (LLaVA's projector does;
    Qwen2-VL's merger sits in its frozen vision encoder); one process is left alone."""
    import torch

    from ppo_train.dist import SINGLE, DistInfo
    from ppo_train.errors import ConfigError
    from ppo_train.model import build_policy
    from ppo_train.train import _vision_stage_fits, _vision_zero_stage

    two = DistInfo(0, 2, 0, torch.device("cpu"))
    for stage, offload, want in (("auto", False, "1"), ("1", False, "1"), ("2", False, "2"), ("0", False, "0")):
        t = OmegaConf.create({"zero_stage": stage, "offload_params": offload})
        _vision_zero_stage(t, two)
        assert str(t.zero_stage) == want
    for stage, offload in (("3", False), ("auto", True)):
        with pytest.raises(ConfigError, match="not supported for vision-language models"):
            _vision_zero_stage(OmegaConf.create({"zero_stage": stage, "offload_params": offload}), two)
    t = OmegaConf.create({"zero_stage": "auto", "offload_params": False})
    _vision_zero_stage(t, SINGLE)
    assert t.zero_stage == "auto"
    cfg = compose(["recipe=tiny_vlm_dpo", f"model={model}"])
    policy = build_policy(cfg, load_tokenizer(cfg.model), SINGLE)
    assert bool(policy.image_params) == trainable_outside_lm
    stage2 = OmegaConf.create({"zero_stage": "2"})
    if trainable_outside_lm:
        with pytest.raises(ConfigError, match="trainer.zero_stage=2: this vision-language model trains"):
            _vision_stage_fits(stage2, two, policy)
    else:
        _vision_stage_fits(stage2, two, policy)
    _vision_stage_fits(stage2, SINGLE, policy)
