"""Config schemas for every Hydra group, registered in Hydra's ConfigStore, and validate().

The schema makes OmegaConf reject unknown keys and wrong types while Hydra composes;
`validate()` then checks values and combinations and raises one `ConfigError` that
lists every problem at once, before any model loads.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ppo_train.errors import ConfigError
from ppo_train.paths import asset_path, smollm2_dir


@dataclass
class LoraSettings:
    """LoRA through peft; on by default for layout=unmasked only by the user's choice."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    merge_on_export: bool = True  # also write the merged model to model/ (adapters go to adapter/)


@dataclass
class ModelConfig:
    # Hub id or local directory of a pretrained causal LM; null with `from_config` set.
    name_or_path: Optional[str] = None
    # Build a model with random weights instead: {model_type: llama, hidden_size: 64, ...}.
    # vocab_size defaults to the tokenizer's length.
    from_config: Optional[Dict[str, Any]] = None
    tokenizer: Optional[str] = None  # defaults to name_or_path
    gguf_file: Optional[str] = None  # a GGUF file inside name_or_path (de-quantized on load)
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # Mask rendering: flex = FlexAttention BlockMask (GPU), sdpa = dense 4-D bool mask,
    # auto = flex on CUDA, sdpa on the CPU (FlexAttention has no CPU backward).
    attention: str = "auto"
    logits_chunk: int = 1024  # response tokens per chunk of the output projection
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class DatasetConfig:
    path: str = MISSING  # a .jsonl/.json/.parquet file or a hub dataset id
    name: Optional[str] = None  # hub dataset config name
    split: str = "train"
    # auto detects per file: preference (prompt/chosen/rejected), implicit (chosen/rejected
    # sharing their leading turns), sharegpt (conversations + chosen/rejected messages).
    format: str = "auto"
    # For implicit-prompt transcripts given as strings (HH-RLHF): the prompt ends at the
    # last occurrence of this marker inside the common prefix of chosen and rejected.
    response_marker: str = "\n\nAssistant:"
    num_rows: Optional[int] = None  # use the first N rows (after loading, before filtering)
    max_prompt_length: int = 512
    max_response_length: int = 512
    # Over-long rows: truncate (prompt keeps its last tokens, responses their first) or drop.
    length_policy: str = "truncate"
    # Scored/ranked lists: keep at most this many responses per prompt (the first ones in the
    # row's order); pairs are all ordered pairs with strictly different scores.
    max_responses: Optional[int] = None
    # Held-out evaluation: a seeded fraction of the examples, or a separate file (same format).
    eval_fraction: float = 0.0
    eval_path: Optional[str] = None
    # Invalid rows (missing fields, empty or identical answers, ...): error stops with the
    # file, row and field; skip drops the row and counts it in data_report.json.
    on_invalid: str = "error"


@dataclass
class LayoutConfig:
    # shared: [P|R1..RK] with the exact mask; paired: K sequences [P|Ri], exact mask;
    # unmasked: paired sequences packed with a causal mask only (no document mask), LoRA only.
    name: str = "shared"
    restart_positions: bool = True  # unmasked: positions restart per sequence (else run on along the row)


@dataclass
class PackingConfig:
    name: str = "ffd"  # none | ffd | sorted
    row_tokens: int = 2048  # ffd: token budget per row (a multiple of pad_multiple)
    rows_per_batch: int = 2  # ffd: rows per micro-batch
    pad_multiple: int = 128  # none/sorted: rows padded to a multiple of this


@dataclass
class LossConfig:
    name: str = "dpo"  # dpo | simpo | orpo | reward | sft
    beta: float = 0.1  # dpo 0.1; simpo 2.0 (set by loss/simpo.yaml)
    variant: str = "sigmoid"  # dpo: sigmoid | ipo | robust | hinge
    label_smoothing: float = 0.0  # dpo robust, simpo
    gamma: float = 1.0  # simpo: target margin, subtracted after scaling by beta
    orpo_lambda: float = 0.1  # orpo: weight of the odds-ratio term
    margin: float = 0.0  # reward: Bradley-Terry margin
    center_coef: float = 0.0  # reward: reward-centering coefficient (Eisenstein et al. 2023)


@dataclass
class ReferenceConfig:
    # null = the initial policy (its log-probs are computed before the first step).
    name_or_path: Optional[str] = None
    gguf_file: Optional[str] = None
    cache: bool = True  # also write the cache to the run directory
    # live: run a frozen reference model beside the policy on every batch (sharded under
    # ZeRO-3) instead of the precomputed table; for when the table would not fit.
    live: bool = False


@dataclass
class TrainerConfig:
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    max_steps: int = -1  # > 0 overrides epochs
    epochs: int = 1
    micro_batch_size: int = 2  # prompts per micro-batch (packing none/sorted)
    grad_accum: int = 1  # micro-batches per optimizer step, per rank
    lr: float = 5.0e-7
    weight_decay: float = 0.0
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1.0e-8
    schedule: str = "linear"  # constant | linear | cosine
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    zero_stage: int = 3
    precision: str = "fp32"  # fp32 | bf16 | fp16
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_checkpointing: bool = False
    log_every: int = 1
    eval_every: int = 0  # evaluate every N steps (0 = only after the last step); needs an eval split
    save_every: int = 500  # checkpoint every N optimizer steps (0 = never; SIGTERM/SIGINT still save)
    keep_last: int = 2  # complete checkpoints kept
    resume: Optional[str] = None  # null | auto (newest complete checkpoint of this run dir) | a path
    on_nonfinite: str = "error"  # error: stop, naming step and examples | skip: drop the micro-batch, count it
    save_model: bool = True


@dataclass
class LoggingConfig:
    progress: bool = True
    wandb: str = "disabled"  # disabled | offline | online (online needs network)
    wandb_project: str = "pptrain"


@dataclass
class Config:
    mode: str = "train"  # train | stats (dataset statistics; the benchmark is scripts/bench.py)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_name: Optional[str] = None  # the recipe's name (names the run directory)


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="pptrain_schema", node=Config)


CHOICES = {
    "model.attention": ("auto", "flex", "sdpa"),
    "dataset.format": ("auto", "preference", "implicit", "sharegpt", "scored", "ranked", "pandalm",
                       "ultrafeedback"),
    "dataset.length_policy": ("truncate", "drop"),
    "dataset.on_invalid": ("error", "skip"),
    "layout.name": ("shared", "paired", "unmasked"),
    "packing.name": ("none", "ffd", "sorted"),
    "loss.name": ("dpo", "simpo", "orpo", "reward", "sft"),
    "loss.variant": ("sigmoid", "ipo", "robust", "hinge"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.schedule": ("constant", "linear", "cosine"),
    "trainer.precision": ("fp32", "bf16", "fp16"),
    "trainer.on_nonfinite": ("error", "skip"),
    "trainer.zero_stage": (0, 1, 2, 3),
    "logging.wandb": ("disabled", "offline", "online"),
    "mode": ("train", "stats"),
}

POSITIVE = (
    "dataset.max_prompt_length", "dataset.max_response_length", "packing.row_tokens",
    "packing.rows_per_batch", "packing.pad_multiple", "trainer.epochs",
    "trainer.micro_batch_size", "trainer.grad_accum", "trainer.log_every", "model.logits_chunk",
)


def _get(cfg: DictConfig, dotted: str) -> Any:
    return OmegaConf.select(cfg, dotted)


def validate(cfg: DictConfig) -> None:
    """Check keys, values and combinations; raise one ConfigError listing every problem."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(problems)


def config_problems(cfg: DictConfig) -> list[str]:
    """Every problem of a composed config: unknown keys, values out of range, bad combinations."""
    from ppo_train.config_keys import unknown_keys

    problems: list[str] = unknown_keys(cfg)
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems.append(f"{key}={value!r}: expected one of {list(allowed)}{hint}")
    for key in POSITIVE:
        if _get(cfg, key) is None or _get(cfg, key) <= 0:
            problems.append(f"{key}={_get(cfg, key)!r}: expected a positive integer")
    m, t, p, d, loss = cfg.model, cfg.trainer, cfg.packing, cfg.dataset, cfg.loss
    if (m.name_or_path is None) == (m.from_config is None):
        problems.append("model: set exactly one of model.name_or_path and model.from_config")
    if m.from_config is not None and m.tokenizer is None:
        problems.append("model.tokenizer: required with model.from_config (which tokenizer sets the vocab?)")
    if m.from_config is not None and "model_type" not in m.from_config:
        problems.append("model.from_config.model_type: required (e.g. llama, qwen2, mistral)")
    if p.pad_multiple > 0 and p.row_tokens % p.pad_multiple:
        problems.append(f"packing.row_tokens={p.row_tokens}: expected a multiple of packing.pad_multiple={p.pad_multiple}")
    if not 0 <= t.warmup_ratio < 1:
        problems.append(f"trainer.warmup_ratio={t.warmup_ratio}: expected 0 <= value < 1")
    if t.lr <= 0:
        problems.append(f"trainer.lr={t.lr}: expected > 0")
    if cfg.loss.beta <= 0:
        problems.append(f"loss.beta={cfg.loss.beta}: expected > 0")
    if not 0 <= cfg.loss.label_smoothing < 0.5:
        problems.append(f"loss.label_smoothing={cfg.loss.label_smoothing}: expected 0 <= value < 0.5")
    if loss.label_smoothing and not (loss.name == "simpo" or (loss.name == "dpo" and loss.variant == "robust")):
        problems.append("loss.label_smoothing: only used by loss=dpo with loss.variant=robust, and by loss=simpo")
    if loss.name != "dpo" and loss.variant != "sigmoid":
        problems.append(f"loss.variant={loss.variant!r}: only loss=dpo has variants")
    if loss.name != "dpo" and cfg.reference.name_or_path is not None:
        problems.append(f"reference.name_or_path: loss={loss.name} is reference-free and never uses a reference "
                        "model; remove the setting (or use loss=dpo)")
    if loss.name != "dpo" and cfg.reference.live:
        problems.append(f"reference.live: loss={loss.name} is reference-free")
    if loss.orpo_lambda < 0 or loss.center_coef < 0:
        problems.append("loss.orpo_lambda and loss.center_coef: expected >= 0")
    if len(t.adam_betas) != 2:
        problems.append(f"trainer.adam_betas={list(t.adam_betas)}: expected two numbers")
    if d.num_rows is not None and d.num_rows <= 0:
        problems.append(f"dataset.num_rows={d.num_rows}: expected a positive integer or null")
    if p.name == "ffd":
        # the smallest unit that the length limits allow to be longest: one pair
        longest = d.max_prompt_length + 2 * d.max_response_length
        if cfg.layout.name == "paired":
            longest += d.max_prompt_length
        if longest > p.row_tokens:
            problems.append(
                f"packing.row_tokens={p.row_tokens}: shorter than the longest allowed unit "
                f"({longest} tokens = dataset.max_prompt_length and two responses of "
                f"dataset.max_response_length in layout={cfg.layout.name}); raise it or lower the limits"
            )
    if d.max_responses is not None and d.max_responses < 2:
        problems.append(f"dataset.max_responses={d.max_responses}: expected >= 2 (or null for no cap)")
    if not 0 <= d.eval_fraction < 1:
        problems.append(f"dataset.eval_fraction={d.eval_fraction}: expected 0 <= value < 1")
    if d.eval_fraction and d.eval_path:
        problems.append("dataset.eval_fraction and dataset.eval_path: set one of them, not both")
    if t.save_every < 0 or t.keep_last < 1:
        problems.append(f"trainer.save_every={t.save_every}, trainer.keep_last={t.keep_last}: expected >= 0 and >= 1")
    if t.eval_every < 0:
        problems.append(f"trainer.eval_every={t.eval_every}: expected >= 0 (0 = at the end only)")
    if cfg.layout.name == "unmasked":
        if loss.name in ("dpo", "reward"):
            problems.append(
                f"layout=unmasked with loss={loss.name}: the mask-free layout lets packed sequences see each "
                "other, so log-probs and rewards are no longer exact, and "
                + ("DPO compares them against an exact reference" if loss.name == "dpo" else
                   "a reward model's scores must be exact") + "; use layout=shared (exact and faster) or "
                "loss=sft/orpo/simpo")
        if not m.lora.enabled:
            problems.append("layout=unmasked: needs model.lora.enabled=true (LoRA on the query/value projections "
                            "learns to ignore the other packed sequences)")
        if p.name != "ffd":
            problems.append(f"layout=unmasked with packing={p.name}: without ffd packing every sequence has its "
                            "own row and the layout is just paired; use packing=ffd")
    if cfg.layout.name != "unmasked" and not cfg.layout.restart_positions:
        problems.append("layout.restart_positions: only used by layout=unmasked")
    if m.lora.enabled and (m.lora.r <= 0 or m.lora.alpha <= 0 or not 0 <= m.lora.dropout < 1 or not m.lora.targets):
        problems.append("model.lora: expected r > 0, alpha > 0, 0 <= dropout < 1 and at least one target")
    for key in ("dataset.path", "dataset.eval_path", "model.name_or_path", "model.tokenizer",
                "reference.name_or_path", "trainer.resume"):
        value = _get(cfg, key)
        if value and value != "auto" and _looks_local(value) and not Path(value).expanduser().exists():
            problems.append(f"{key}={value!r}: no such file or folder (resolved to "
                            f"{str(Path(value).expanduser().resolve())!r}); a hub id has the form org/name")
    return problems


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or Path(path).suffix in (".jsonl", ".json", ".parquet")


def register_resolvers() -> None:
    """`${asset:smollm2}` resolves to a folder bundled with the package (a path, never code)."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda rel: str(asset_path(rel)))
    if not OmegaConf.has_resolver("smollm2_dir"):
        OmegaConf.register_new_resolver("smollm2_dir", smollm2_dir)
