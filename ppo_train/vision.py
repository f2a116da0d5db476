"""Vision-language models: the processor, the images of a row, the image inputs of a batch.

The images of a row belong to its prompt. A row gives them in an `images` column (TRL's
vision format): local paths (relative to the data file's folder), encoded bytes, a
`{"bytes", "path"}` dict (a datasets Image column read undecoded) or decoded PIL images; each
`{"type": "image"}` part of the prompt's messages takes the next one. The processor expands
each placeholder into the image's feature tokens, so the prompt's token ids already hold
them: they are packed, masked and counted like any prompt token, and in `layout=shared` the
images of a prompt go through the vision encoder once for all of its responses (in
`layout=paired` once per response, the usual cost).

Images are kept as references (a path, bytes or the given PIL image) and decoded again when a
micro-batch is collated, so memory does not grow with the data's pixels.

M-RoPE models (the Qwen2-VL family) place image tokens on a (temporal, height, width) grid:
the prompt's 3-D positions come from the model's own `get_rope_index`, and every response
continues from the prompt on all three axes (1-D position + the prompt's rope delta, the rule
the model applies to text that follows the prompt), exactly as in a separate
`[images + prompt | response]` forward.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppo_train.data.images import image_digest, image_ref, open_image, set_pixel_limit  # noqa: F401 (re-exported)
from ppo_train.errors import ModelLoadError

VISION_TOWERS = ("visual", "vision_tower", "vision_model")  # Qwen2-VL, LLaVA, others


def is_vision_config(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def load_processor(source: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's processor (`AutoProcessor`). A processor that also handles video needs
    torchvision for its video half; where torchvision is missing (CPU-only installs), or the
    folder has no video settings (a model exported where torchvision was missing), the same
    processor class is built without it: images and text are processed by the library's code
    unchanged; pptrain trains on images only."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        if getattr(processor, "image_processor", None) is None:  # AutoProcessor fell back to a tokenizer
            raise ModelLoadError(f"model.processor={source!r}: holds no image processor ({type(processor).__name__}); "
                                 "give the folder or hub id of the vision-language model's processor")
        return processor
    except (ImportError, OSError) as err:
        message = str(err).lower()
        if "torchvision" not in message and "video processor" not in message:
            if isinstance(err, ImportError):
                raise
            raise ModelLoadError(f"model.processor={source!r}: cannot load a processor from it ({err}); "
                                 "give a local folder with processor files or a hub id") from err
        cls = _processor_class(source, revision)
        if cls is None or "video_processor" not in inspect.signature(cls.__init__).parameters:
            raise ModelLoadError(f"model.processor={source!r}: {err}") from err
        return _images_only(cls).from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise ModelLoadError(f"model.processor={source!r}: cannot load a processor from it ({err}); "
                             "give a local folder with processor files or a hub id") from err


def _processor_class(source: str, revision: str | None):
    import transformers
    from transformers.utils import cached_file

    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = cached_file(source, name, revision=revision, _raise_exceptions_for_missing_entries=False)
        if path:
            cls_name = json.loads(Path(path).read_text()).get("processor_class")
            if cls_name and hasattr(transformers, cls_name):
                return getattr(transformers, cls_name)
    return None


def _images_only(cls):
    """`cls` with its attributes limited to the image processor and the tokenizer (transformers
    reads a processor's parts from its __init__ signature). It keeps the class's name, so what
    it saves (an exported model's processor_config.json) names the full class."""

    class ImagesOnly(cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = cls.__name__
    return ImagesOnly


@dataclass(frozen=True)
class ImageInputs:
    """The image tensors of one micro-batch: its image references in the order of their
    placeholder tokens in the flattened (rows x length) ids -> the processor's image outputs
    (pixel_values, image_grid_thw, ...), as the model scatters them in that order."""

    processor: Any

    def __call__(self, refs: list) -> dict[str, torch.Tensor]:
        if not refs:
            return {}
        images = [open_image(r) for r in refs]
        out = self.processor.image_processor(images=images, return_tensors="pt")
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


class RopeIndex:
    """The M-RoPE position rule of a model that has one (`get_rope_index`), from its config: a
    meta-device instance holds no weights, only the rule."""

    def __init__(self, config):
        from transformers import AutoModel

        with torch.device("meta"):
            self.model = AutoModel.from_config(config)
        self.image_token_id = config.image_token_id

    @staticmethod
    def of(config) -> "RopeIndex | None":
        if not is_vision_config(config):
            return None
        from transformers import AutoModel

        rule = getattr(AutoModel._model_mapping[type(config)], "get_rope_index", None)
        return RopeIndex(config) if rule is not None else None

    def prompt(self, ids: list[int], grids: torch.Tensor | None) -> tuple[np.ndarray, int]:
        """((3, P) positions of the prompt's tokens, delta): text following the prompt at 1-D
        position p sits at p + delta on every axis."""
        t = torch.tensor([ids], dtype=torch.long)
        kinds = (t == self.image_token_id).int()
        if grids is None or not kinds.any():
            return np.tile(np.arange(len(ids), dtype=np.int64), (3, 1)), 0
        positions, delta = self.model.get_rope_index(t, mm_token_type_ids=kinds, image_grid_thw=grids)
        return positions[:, 0].numpy().astype(np.int64), int(delta.reshape(-1)[0])


def vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The vision encoder of a vision-language model (None for a text model)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    for holder in (base, model):
        for name in VISION_TOWERS:
            tower = getattr(holder, name, None)
            if isinstance(tower, torch.nn.Module):
                return tower
    return None


def freeze_vision_tower(model: torch.nn.Module) -> int:
    """Stop gradients into the vision encoder; returns the number of frozen parameters."""
    tower = vision_tower(model)
    if tower is None:
        return 0
    count = 0
    for p in tower.parameters():
        p.requires_grad_(False)
        count += p.numel()
    return count
