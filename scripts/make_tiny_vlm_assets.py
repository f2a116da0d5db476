"""Write the processors of the two tiny vision-language test models into ppo_train/assets/.

    python scripts/make_tiny_vlm_assets.py

Both start from the bundled SmolLM2 tokenizer (ppo_train/assets/smollm2) with the image tokens
added as special tokens, and pin the PIL image processors (identical pixels with and without
torchvision):
- tiny_qwen2_vl/: a Qwen2VLProcessor (ChatML template, <|vision_start|><|image_pad|><|vision_end|>
  per image; dynamic resolution between 2x2 and 6x6 merged 28-pixel patches, so images of
  different sizes get different token grids);
- tiny_llava/: a LlavaProcessor (LLaVA-1.5 style USER:/ASSISTANT: template, <image> per image;
  56x56 crops, 16 image tokens per image).
The model configs that go with them are configs/model/tiny_qwen2_vl.yaml and tiny_llava.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

ASSETS = Path(__file__).resolve().parents[1] / "ppo_train" / "assets"

QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def tokenizer_with(tokens: list[str]):
    tok = AutoTokenizer.from_pretrained(ASSETS / "smollm2")
    tok.add_special_tokens({"additional_special_tokens": tokens})
    return tok


def qwen2_vl(out: Path) -> None:
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ppo_train.vision import _images_only

    tok = tokenizer_with(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    images = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 36)
    # the video half of Qwen2VLProcessor needs torchvision, which is not needed to write it
    processor = _images_only(Qwen2VLProcessor)(image_processor=images, tokenizer=tok, chat_template=QWEN_TEMPLATE)
    processor.save_pretrained(out)
    config = json.loads((out / "processor_config.json").read_text())
    config["processor_class"] = "Qwen2VLProcessor"  # the class users load (with torchvision: its video half too)
    image = config["image_processor"]
    config["video_processor"] = {"video_processor_type": "Qwen2VLVideoProcessor",
                                 **{k: image[k] for k in ("patch_size", "merge_size", "temporal_patch_size", "size",
                                                          "image_mean", "image_std")}}
    (out / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def llava(out: Path) -> None:
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = tokenizer_with(["<image>"])
    images = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>", chat_template=LLAVA_TEMPLATE)
    processor.save_pretrained(out)


if __name__ == "__main__":
    for name, write in (("tiny_qwen2_vl", qwen2_vl), ("tiny_llava", llava)):
        folder = ASSETS / name
        folder.mkdir(exist_ok=True)
        write(folder)
        tokenizer = folder / "tokenizer.json"  # written indented; the same JSON compact is half the size
        tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), separators=(",", ":"), ensure_ascii=False))
        print(f"wrote {folder}: {sorted(p.name for p in folder.iterdir())}")
