"""Issue 29, items 3-4: LoRA on a vision-language model puts no adapters in the frozen vision
encoder (its attention has q_proj/v_proj too), nothing outside the language model trains (so
the ZeRO-2 rule of train._vision_stage_fits lets it through), and the export carries the
processor: model/ and adapter/ load with the processor like a full-weights export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ppo_train.cli import compose
from ppo_train.dist import DistInfo
from ppo_train.model import build_policy, load_tokenizer
from ppo_train.scoring import image_params
from ppo_train.train import train
from ppo_train.vision import load_processor, vision_tower

FAMILIES = ["llava", "qwen2_vl"]
TOWER = {"llava": "vision_tower", "qwen2_vl": "visual"}


def _cfg(family: str, *extra: str):
    return compose(["recipe=tiny_vlm_dpo", f"model=tiny_{family}", "model.lora.enabled=true", "dataset.num_rows=8",
                    "logging.progress=false", "run_name=t", "trainer.self_check=false", *extra])


def _lora_names(module: torch.nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters() if "lora_" in n]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tower_trains", [False, True])
def test_lora_targets_stay_in_the_language_model_unless_the_tower_trains(family, tower_trains):
    cfg = _cfg(family, f"model.train_vision_tower={str(tower_trains).lower()}")
    tokenizer = load_tokenizer(cfg.model)
    policy = build_policy(cfg, tokenizer, DistInfo(0, 1, 0, torch.device("cpu")))
    model = policy.model
    tower = vision_tower(model)
    assert _lora_names(model), "no adapters at all"
    in_tower = _lora_names(tower)
    outside = [p for p in image_params(model)]  # trainable parameters outside the language model
    if tower_trains:  # CLIP's attention has q_proj/v_proj; Qwen2-VL's vision blocks a fused qkv (no match)
        if family == "llava":
            assert in_tower and all(p.requires_grad for n, p in tower.named_parameters() if "lora_" in n)
            assert outside
    else:
        assert in_tower == [], in_tower[:4]
        assert outside == []  # nothing outside the language model trains: ZeRO-2 across ranks is safe


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_vlm_trains_only_language_adapters_and_exports_the_processor(tmp_path, family):
    run_dir = tmp_path / "run"
    cfg = _cfg(family, "trainer.max_steps=2")
    train(cfg, run_dir)
    adapters = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert adapters and not [k for k in adapters if f".{TOWER[family]}." in k], sorted(adapters)[:4]
    assert any(float(v.abs().max()) > 0 for k, v in adapters.items() if "lora_B" in k), "the adapters did not move"
    assert TOWER[family] in json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["exclude_modules"]
    for folder in ("model", "adapter"):
        assert (run_dir / folder / "processor_config.json").is_file(), sorted(p.name for p in (run_dir / folder).iterdir())
        processor = load_processor(str(run_dir / folder))
        assert processor.image_token_id == cfg.model.from_config.image_token_id
    if family == "llava":  # needs no torchvision: the plain transformers call a user makes
        from transformers import AutoProcessor

        assert AutoProcessor.from_pretrained(run_dir / "model").image_processor is not None
