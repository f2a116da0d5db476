"""LoRA through peft: wrap the model, and export adapters plus the merged model.

Default targets are the attention query and value projections (`q_proj`, `v_proj`), the
choice of the mask-free packing work this option follows: there the adapters learn to
attenuate attention to the other sequences of a packed row.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ppo_train import fileio


def lora_config(settings: DictConfig, reward: bool = False):
    from peft import LoraConfig, TaskType

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.targets),
                      task_type=TaskType.SEQ_CLS if reward else TaskType.CAUSAL_LM)


def apply_lora(model, settings: DictConfig, reward: bool = False):
    """Inject LoRA layers in place; return (peft model, the transformers model inside it).
    Only the adapters (and a reward model's new head) are trainable."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(settings, reward))
    return peft_model, peft_model.get_base_model()


def export_lora(state: dict, fresh_model, settings: DictConfig, out_dir: Path, tokenizer, reward: bool = False) -> None:
    """Rank 0: load the gathered weights (transformers keys, LoRA layers included) into a fresh
    model with the same adapters, write `<out>/../adapter` and, if asked, the merged model."""
    peft_model, inner = apply_lora(fresh_model, settings, reward)
    missing, unexpected = inner.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lora_" in k]:
        raise RuntimeError(f"LoRA export: unexpected keys {unexpected[:5]}, missing adapter keys {missing[:5]}")
    with fileio.staged(out_dir.with_name("adapter")) as tmp:
        peft_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    if settings.merge_on_export:
        merged = peft_model.merge_and_unload()
        with fileio.staged(out_dir) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
