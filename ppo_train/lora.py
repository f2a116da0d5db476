"""LoRA through peft: wrap the model, and export adapters plus the merged model.

Default targets are the attention query and value projections (`q_proj`, `v_proj`), the
choice of the mask-free packing work this option follows: there the adapters learn to
attenuate attention to the other sequences of a packed row.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig

from ppo_train import fileio


def lora_config(settings: DictConfig, reward: bool = False, exclude: str | None = None):
    from peft import LoraConfig, TaskType

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.targets), exclude_modules=exclude,
                      task_type=TaskType.SEQ_CLS if reward else TaskType.CAUSAL_LM)


def frozen_tower_pattern(model, tower_trains: bool) -> str | None:
    """The modules LoRA must leave alone: a vision-language model's vision encoder while it is
    frozen (model.train_vision_tower=false). Its attention also has `q_proj`/`v_proj` (CLIP's
    does), which the default targets would otherwise match: adapters would train inside the
    frozen tower. A regular expression over module names (peft's `exclude_modules`)."""
    from ppo_train.vision import vision_tower

    tower = None if tower_trains else vision_tower(model)
    if tower is None:
        return None
    name = next(n for n, m in model.named_modules() if m is tower)
    return rf"{re.escape(name)}(\..*)?"


def apply_lora(model, settings: DictConfig, reward: bool = False, tower_trains: bool = False):
    """Inject LoRA layers in place; return (peft model, the transformers model inside it).
    Only the adapters (and a reward model's new head) are trainable; a vision-language model's
    frozen vision encoder gets none (`frozen_tower_pattern`)."""
    from peft import get_peft_model

    exclude = frozen_tower_pattern(model, tower_trains)
    peft_model = get_peft_model(model, lora_config(settings, reward, exclude))
    return peft_model, peft_model.get_base_model()


def export_lora(state: dict, fresh_model, settings: DictConfig, out_dir: Path, saver, reward: bool = False,
                tower_trains: bool = False) -> None:
    """Rank 0: load the gathered weights (transformers keys, LoRA layers included) into a fresh
    model with the same adapters, write `<out>/../adapter` and, if asked, the merged model, each
    with `saver`'s files (the tokenizer; a vision-language model's processor)."""
    peft_model, inner = apply_lora(fresh_model, settings, reward, tower_trains)
    missing, unexpected = inner.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lora_" in k]:
        raise RuntimeError(f"LoRA export: unexpected keys {unexpected[:5]}, missing adapter keys {missing[:5]}")
    with fileio.staged(out_dir.with_name("adapter")) as tmp:
        peft_model.save_pretrained(tmp)
        saver.save_pretrained(tmp)
    if settings.merge_on_export:
        merged = peft_model.merge_and_unload()
        with fileio.staged(out_dir) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            saver.save_pretrained(tmp)
