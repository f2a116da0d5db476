"""Load the tokenizer and the model, plug our attention in through transformers'
AttentionInterface, and build the module that training wraps (`build_policy`).

Attention: `pptrain_sdpa` (registered here; `model.attention=sdpa`) is transformers' own SDPA
function on our dense 4-D boolean mask, called once per document run of each row when the
scorer passes the runs (`pptrain_spans`, CPU only); `pptrain_flex` (registered here) runs
FlexAttention with our BlockMask, compiled on CUDA.
A 4-D mask or a BlockMask is used exactly as given by transformers, so it never guesses
documents from the position ids (which would split a response from its prompt).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import (AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoModelForSequenceClassification, AutoTokenizer)

from ppo_train.errors import ModelLoadError
from ppo_train.fileio import is_local_path
from ppo_train.lora import apply_lora, export_lora
from ppo_train.vision import ImageInputs, RopeIndex, freeze_vision_tower, is_vision_config, load_processor

FLEX = "pptrain_flex"
SDPA = "pptrain_sdpa"


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_kernel(query: torch.Tensor):
    """Compiled FlexAttention on CUDA; eager elsewhere (the CPU runs it without grad only)."""
    from torch.nn.attention.flex_attention import flex_attention

    return _compiled_flex() if query.is_cuda else flex_attention


def same_grad(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """In a pass that trains anything, every one of q, k, v requires grad.

    Dynamo guards on each input's requires_grad. With LoRA on q_proj/v_proj and frozen
    embeddings, layer 0's key needs no grad while its query and value do, and every later layer's
    three do: two training graphs per row length instead of one, which with three row lengths
    and the no-grad pass makes 9 graphs, past dynamo's limit of 8 (flex then runs eagerly and
    materializes (B, H, L, L) scores). A tensor that needs no grad is given as a detached leaf
    that does: its gradient is computed by the kernel anyway and then dropped."""
    if not torch.is_grad_enabled():
        return query, key, value
    tensors = (query, key, value)
    if not any(t.requires_grad for t in tensors) or all(t.requires_grad for t in tensors):
        return tensors
    return tuple(t if t.requires_grad else t.detach().requires_grad_() for t in tensors)


def flex_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query (B, Hq, L, D), key/value (B, Hkv, L, D), attention_mask a BlockMask -> (B, L, Hq, D).
    Under autocast (bf16 mixed precision at ZeRO stage 0) rotary embeddings leave q and k in the
    residual stream's fp32 and v in bf16; flex_attention's own autocast rule casts all three."""
    query, key, value = same_grad(query, key, value)
    out = _flex_kernel(query)(query, key, value, block_mask=attention_mask, scale=scaling,
                              enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def segmented_sdpa_forward(module, query, key, value, attention_mask, pptrain_spans=None, **kwargs):
    """transformers' SDPA attention; with `pptrain_spans` (masks.doc_spans of the batch) once per
    document run of each row, on that run's diagonal block of the mask. No query attends
    outside its run, so the result is the same attention (to rounding: SDPA's CPU kernel then
    reduces over shorter rows), at sum(len^2) instead of L^2 per row: the CPU counterpart of
    FlexAttention skipping empty blocks. query (B, Hq, L, D) -> (B, L, Hq, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if pptrain_spans is None or attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = []
    for b, spans in enumerate(pptrain_spans):
        parts = [sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                        attention_mask[b:b + 1, :, s:e, s:e], **kwargs)[0] for s, e in spans]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return (rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)), None


AttentionInterface.register(FLEX, flex_attention_forward)
AttentionInterface.register(SDPA, segmented_sdpa_forward)


def attn_implementation(backend: str) -> str:
    return FLEX if backend == "flex" else SDPA


def _attention_for(config, impl: str):
    """A vision-language model takes pptrain's attention in its language model only; its vision
    encoder keeps SDPA (its images are not packed, and it runs no pptrain mask)."""
    if not is_vision_config(config):
        return impl
    return {"text_config": impl, "vision_config": "sdpa"}


def model_config(cfg: DictConfig, vocab_size: int | None = None, extra: dict | None = None):
    """The model's transformers config, without weights: from `from_config` (vocab_size filled in
    from the tokenizer; a vision-language model's in its text_config) or from the checkpoint's."""
    if cfg.name_or_path is None:
        kwargs = OmegaConf.to_container(cfg.from_config, resolve=True)
        model_type = kwargs.pop("model_type")
        if "vision_config" in kwargs:  # the vocabulary lives in the language model's config
            kwargs.setdefault("text_config", {})
            if vocab_size is not None:
                kwargs["text_config"].setdefault("vocab_size", vocab_size)
        elif vocab_size is not None:
            kwargs.setdefault("vocab_size", vocab_size)
        return AutoConfig.for_model(model_type, **kwargs, **(extra or {}))
    return AutoConfig.from_pretrained(cfg.name_or_path, gguf_file=cfg.gguf_file, revision=cfg.revision,
                                      trust_remote_code=cfg.trust_remote_code)


def load_vision(cfg: DictConfig, tokenizer):
    """What tokenizing and collating image rows needs (a data.tokenize.VisionText), or None for a
    text model: the processor of `model.processor` (default: model.tokenizer, then
    model.name_or_path) and, for an M-RoPE model, its position rule. Reads no weights."""
    from ppo_train.data.tokenize import VisionText

    try:
        config = model_config(cfg, len(tokenizer))
    except (OSError, ValueError) as err:
        source = repr(cfg.name_or_path) if cfg.name_or_path else "model.from_config"
        raise ModelLoadError(f"cannot load the config of model {source}: {err}") from err
    if not is_vision_config(config):
        return None
    processor = load_processor(cfg.processor or cfg.tokenizer or cfg.name_or_path, cfg.revision,
                               cfg.trust_remote_code)
    if len(processor.tokenizer) != len(tokenizer):
        raise ModelLoadError(f"model.processor's tokenizer has {len(processor.tokenizer)} tokens and model.tokenizer "
                             f"{len(tokenizer)}; give one folder for both")
    token = getattr(processor, "image_token_id", None)
    if getattr(config, "image_token_id", None) != token:
        raise ModelLoadError(f"the model's image_token_id is {getattr(config, 'image_token_id', None)} and its "
                             f"processor's image token has id {token}; they must agree")
    return VisionText(processor, RopeIndex.of(config))


def image_inputs(vision) -> ImageInputs | None:
    """The collate-side image processing of a VisionText (None for a text model)."""
    return ImageInputs(vision.processor) if vision is not None else None


def load_tokenizer(cfg: DictConfig, reward: bool = False):
    """The tokenizer of `model.tokenizer` (default `model.name_or_path`). Padding is masked out
    and never scored, so a missing pad token becomes EOS; for a reward model (`reward=True`)
    the pad token must not be EOS, because the exported classifier pools at the last non-pad
    token: EOS-as-pad becomes UNK or BOS when either differs from EOS, else a new pad token is
    added (load_causal_lm grows the embeddings to the tokenizer's length)."""
    source = cfg.tokenizer or cfg.name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:  # no such folder or hub id; a folder without tokenizer files
        raise ModelLoadError(f"model.tokenizer={source!r}: cannot load a tokenizer from it ({err}); "
                             "give a local folder with tokenizer files or a hub id") from err
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if reward and tok.pad_token_id == tok.eos_token_id:
        other = next((t for t in (tok.unk_token, tok.bos_token)
                      if t is not None and tok.convert_tokens_to_ids(t) != tok.eos_token_id), None)
        if other is not None:
            tok.pad_token = other
        else:  # no token that is provably not EOS: add one (the model's embeddings grow to match)
            tok.add_special_tokens({"pad_token": "<|pptrain_pad|>"})
    return tok


def load_causal_lm(cfg: DictConfig, vocab_size: int, dtype: torch.dtype, backend: str, seed: int,
                   name_or_path: str | None = None, gguf_file: str | None = None, reward: bool = False,
                   pad_token_id: int | None = None, longest_sequence: int = 0, zero3: dict | None = None):
    """A causal LM (or, with reward=True, a one-label AutoModelForSequenceClassification whose
    head starts at random) from a hub id / local folder, or from `from_config` with seeded
    random weights. Refused (ModelLoadError) when pptrain would not reproduce its log-probs
    (`architecture_problems`; `longest_sequence` is the data's longest prompt + response), and
    when the checkpoint lacks weights the model needs (unless model.allow_missing_weights).

    `zero3`: a ZeRO-3 DeepSpeed config. A pretrained model is then partitioned while it loads
    (transformers' zero.Init through HfDeepSpeedConfig): no rank ever holds all of it. Models
    from `from_config` (random weights, for tests and small runs) and GGUF files are built whole
    on every rank, so their weights are the same for every world size and ZeRO stage.

    A vision-language model (a config with a vision_config) loads as AutoModelForImageTextToText."""
    impl = attn_implementation(backend)
    extra = {"num_labels": 1, "pad_token_id": pad_token_id} if reward else {}
    name_or_path = name_or_path or cfg.name_or_path
    if name_or_path is None:
        config = model_config(cfg, vocab_size, extra)
        auto = _auto_class(config, reward)
        check_architecture(config, longest_sequence, backend)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = auto.from_config(config, attn_implementation=_attention_for(config, impl), dtype=dtype)
        return model
    local = Path(name_or_path).expanduser()
    if is_local_path(name_or_path) and not local.is_dir():
        raise ModelLoadError(f"model path {name_or_path!r} does not exist; give a folder saved with "
                             "save_pretrained or a hub id")
    if local.is_dir() and not gguf_file and not cfg.gguf_file and not list(local.glob("*.safetensors")) \
            and list(local.glob("*.bin")):
        raise ModelLoadError(f"model path {name_or_path!r} holds only pickle weights (*.bin), which pptrain does not "
                             "load (unpickling can run code); convert it with save_pretrained(safe_serialization=True)")
    gguf_file = gguf_file or cfg.gguf_file
    try:
        config = AutoConfig.from_pretrained(name_or_path, gguf_file=gguf_file, revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
        check_architecture(config, longest_sequence, backend)
        auto = _auto_class(config, reward)
        with torch.random.fork_rng(), _partitioned(zero3 if not gguf_file else None):
            torch.manual_seed(seed)  # a new reward head starts from the same weights on every rank
            model, info = auto.from_pretrained(
                name_or_path, gguf_file=gguf_file, revision=cfg.revision, dtype=dtype,
                attn_implementation=_attention_for(config, impl),
                trust_remote_code=cfg.trust_remote_code, use_safetensors=None if gguf_file else True,
                output_loading_info=True, **extra)
            if vocab_size > model.get_input_embeddings().num_embeddings:  # a pad token was added (reward models)
                model.resize_token_embeddings(vocab_size)
    except (OSError, ValueError) as err:  # no weights, an unknown model type, remote code refused
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {err}") from err
    missing = [k for k in info.get("missing_keys", []) if not (reward and k.startswith("score."))]
    if missing and not cfg.allow_missing_weights:
        raise ModelLoadError(
            f"model {name_or_path!r}: {len(missing)} weight(s) the model needs are not in the checkpoint "
            f"({', '.join(sorted(missing)[:4])}{', ...' if len(missing) > 4 else ''}); they would start at random. "
            "This is almost always an incomplete download or a checkpoint of another architecture; "
            "model.allow_missing_weights=true loads it anyway")
    return _plain_copy(model, auto, impl, dtype) if gguf_file else model


def _auto_class(config, reward: bool):
    if is_vision_config(config):
        if reward:
            raise ModelLoadError(f"model_type {config.model_type}: reward models (a sequence-classification head) "
                                 "are not supported for vision-language models; use a policy loss (dpo, simpo, orpo, "
                                 "sft)")
        return AutoModelForImageTextToText
    return AutoModelForSequenceClassification if reward else AutoModelForCausalLM


@contextlib.contextmanager
def _partitioned(zero3: dict | None):
    """Inside, transformers builds pretrained models under deepspeed.zero.Init (ZeRO-3)."""
    if zero3 is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(zero3)  # transformers keeps only a weak reference: hold it while loading
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep


def _plain_copy(model, auto, impl: str, dtype: torch.dtype):
    """A GGUF checkpoint loads de-quantized but still flagged as quantized (and so not
    saveable); rebuild it as an ordinary model with the same weights."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = auto.from_config(config, attn_implementation=impl, dtype=dtype)
    plain.load_state_dict(model.state_dict())
    return plain


# Settings that change the math where pptrain does not reproduce it: in the output head (pptrain
# projects hidden states itself, in chunks) or inside attention (pptrain's masked attention
# function takes no soft-cap). Each with the values that mean "off".
_HEAD_AND_ATTENTION = {"final_logit_softcapping": (None, 0, 0.0), "attn_logit_softcapping": (None, 0, 0.0),
                       "logit_scale": (None, 1, 1.0), "logits_scaling": (None, 1, 1.0)}


def architecture_problems(config, longest_sequence: int = 0, backend: str = "sdpa") -> list[str]:
    """Why pptrain's log-probs would differ from the model's own for this config (empty if they
    match). `longest_sequence`: the longest [prompt | response] of the data, in tokens; a
    sliding window shorter than that would be ignored (documents attend in full). With the
    flex backend, attention dropout would be ignored (pptrain's flex function applies none), and a
    head dimension below 16 cannot be compiled."""
    problems = [f"{name}={getattr(config, name)}" for name, off in _HEAD_AND_ATTENTION.items()
                if getattr(config, name, None) not in off]
    dropout = getattr(config, "attention_dropout", 0.0) or 0.0
    if backend == "flex" and dropout > 0:
        problems.append(f"attention_dropout={dropout} with model.attention=flex (FlexAttention has no dropout; "
                        "set it to 0 or use model.attention=sdpa)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if backend == "flex" and head_dim < 16:
        # inductor's flex kernel (tl.dot) refuses it: "embedding dimension ... at least 16"
        problems.append(f"head_dim={head_dim} with model.attention=flex (compiled FlexAttention needs a head "
                        "dimension of at least 16; use model.attention=sdpa)")
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    windowed = getattr(config, "use_sliding_window", None)
    if windowed is None:
        windowed = layer_types is None or "sliding_attention" in layer_types
    if window and windowed and longest_sequence > window:
        problems.append(f"sliding_window={window} shorter than the longest prompt + response ({longest_sequence} "
                        "tokens; lower dataset.max_prompt_length/max_response_length)")
    return problems


def check_architecture(config, longest_sequence: int = 0, backend: str = "sdpa") -> None:
    """Raise ModelLoadError (before any weights load) when architecture_problems finds any (for
    a vision-language model: in its language model)."""
    problems = architecture_problems(config.get_text_config(), longest_sequence, backend)
    if problems:
        raise ModelLoadError(
            f"model_type {config.model_type}: {'; '.join(problems)}: pptrain does not "
            "reproduce this, so its log-probs would be wrong; tested architectures: llama, qwen2, mistral, "
            "llava, qwen2_vl")


def weights_identity(name_or_path: str | None, revision: str | None = None) -> dict:
    """What the weights behind `name_or_path` are, for cache fingerprints: the name, size and
    modification time of every weight and config file of a local folder; the commit of a hub
    model's cached snapshot (None when it is not cached). Random weights (no path): empty."""
    if not name_or_path:
        return {}
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return {"files": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(local.iterdir())
                          if f.suffix in (".safetensors", ".gguf", ".bin", ".json") and f.is_file()]}
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(name_or_path, revision=revision, local_files_only=True,
                                   allow_patterns=["config.json"])
        return {"commit": Path(folder).name}
    except Exception:  # noqa: BLE001 - not cached (or no hub library state): nothing to pin
        return {"commit": None}


def build_policy(cfg: DictConfig, tokenizer, dist, longest_sequence: int = 0) -> torch.nn.Module:
    """The trained module: the model (a causal LM, or a one-label classifier for a reward loss),
    with LoRA adapters if asked, gradient checkpointing if asked, wrapped for scoring. A
    vision-language model's vision encoder is frozen unless model.train_vision_tower."""
    from ppo_train.engine import zero3_config
    from ppo_train.losses import LOSSES
    from ppo_train.masks import resolve_backend
    from ppo_train.precision import Numerics
    from ppo_train.scoring import PolicyModule, RewardModule

    reward = LOSSES[cfg.loss.name].reward_head
    numerics = Numerics.of(cfg.trainer, dist.world_size)
    model = load_causal_lm(cfg.model, len(tokenizer), numerics.param_dtype,
                           resolve_backend(cfg.model.attention, dist.device), cfg.trainer.seed, reward=reward,
                           pad_token_id=tokenizer.pad_token_id, longest_sequence=longest_sequence,
                           zero3=zero3_config(cfg.trainer, dist.world_size))
    if not cfg.model.train_vision_tower:
        freeze_vision_tower(model)
    if cfg.model.lora.enabled:
        peft_model, model = apply_lora(model, cfg.model.lora, reward=reward, tower_trains=cfg.model.train_vision_tower)
        if dist.is_main:
            peft_model.print_trainable_parameters()
    if cfg.trainer.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    recompute = cfg.model.logits_recompute
    recompute = dist.device.type == "cuda" if recompute is None else recompute
    if reward:
        return RewardModule(model, numerics.autocast)
    from ppo_train.losses.dpo import wants_shared_sums

    return PolicyModule(model, cfg.model.logits_chunk, dist, recompute, numerics.autocast,
                        shared_sums=wants_shared_sums(cfg.loss), wpo=bool(cfg.loss.get("wpo", False)))


def lora_writer(cfg: DictConfig, tokenizer, saver=None, world_size: int = 1):
    """The `writer(state, out_dir)` that Engine.export calls on rank 0 for a LoRA run: a fresh
    model (same config and seed) receives the gathered weights with its adapters and is written
    by lora.export_lora (adapters, and the merged model if asked) with `saver`'s files (default:
    the tokenizer; a vision-language model passes its processor)."""
    from ppo_train.losses import LOSSES
    from ppo_train.precision import Numerics

    reward = LOSSES[cfg.loss.name].reward_head
    dtype = Numerics.of(cfg.trainer, world_size).param_dtype

    def write(state: dict, out_dir: Path) -> None:
        fresh = load_causal_lm(cfg.model, len(tokenizer), dtype, "sdpa", cfg.trainer.seed,
                               reward=reward, pad_token_id=tokenizer.pad_token_id)
        export_lora(state, fresh, cfg.model.lora, out_dir, saver or tokenizer, reward=reward,
                    tower_trains=cfg.model.train_vision_tower)

    return write
