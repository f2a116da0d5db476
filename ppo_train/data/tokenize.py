"""Tokenize prompt and responses separately, so every response shares the same prefix ids.

Convention (TRL's): the prompt is tokenized with the tokenizer's usual special tokens
(a BOS where the tokenizer adds one); each response without special tokens, and ends in
EOS. Conversational rows go through the chat template: the prompt is rendered with
`add_generation_prompt=True`, a response is what the template adds after that prompt
when rendering the whole conversation (the rendered prompt must be a prefix of it). A
template that closes the turn with the EOS token (ChatML's `<|im_end|>`) is not given a
second EOS. The template renders the prompt with its BOS, so the ids are not given a second one.

Length policy: `truncate` keeps the prompt's last `max_prompt_length` tokens and each
response's first `max_response_length` tokens; `drop` removes the example. Both are
counted in the `TokenizeReport`.

Images (vision-language models, given a `VisionText`): the prompt is rendered by the
processor's chat template and tokenized by the processor with its images, which expands each
image placeholder into the image's feature tokens. Such a prompt is never truncated (cutting
image tokens would break the image): over `max_prompt_length` it is dropped and counted. For
M-RoPE models the prompt's 3-D positions come from the model's own rule (`vision.RopeIndex`).

Special tokens inside the data's text (`<|im_end|>\n<|im_start|>system ...` in a user message)
would be encoded as real control tokens, silently turning data into a turn boundary or a
system message. Such a row is invalid: `dataset.on_invalid=error` stops naming the file, row,
field and token; `skip` drops it and counts it (`rows_with_special_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from omegaconf import DictConfig

from ppo_train.data.sources import DataError, PreferenceExample


@dataclass
class TokenizedExample:
    index: int  # row number in the source
    prompt_ids: list[int]
    response_ids: list[list[int]]
    pairs: list[tuple[int, int]]
    scores: list[float] | None = None
    images: list | None = None  # the prompt's image references, in the order of their tokens
    mrope: np.ndarray | None = None  # (3, P) M-RoPE positions of the prompt (M-RoPE models only)
    rope_delta: int = 0  # text after the prompt at 1-D position p sits at p + rope_delta (M-RoPE)
    image_tokens: int = 0  # of the prompt's tokens, those that carry image features
    labels: list[float] | None = None  # per pair, 1 desirable / 0 undesirable (loss=kto's view); None: 1 each

    @property
    def shared_length(self) -> int:
        return len(self.prompt_ids) + sum(len(r) for r in self.response_ids)

    @property
    def paired_length(self) -> int:
        return len(self.prompt_ids) * len(self.response_ids) + sum(len(r) for r in self.response_ids)


@dataclass
class TokenizeReport:
    examples: int = 0
    truncated_prompts: int = 0
    truncated_responses: int = 0
    dropped_too_long: int = 0
    special_token_rows: int = 0  # rows skipped because their text holds a special token
    image_rows: int = 0  # rows skipped because the processor cannot take their images
    skip_messages: list[str] = field(default_factory=list)

    def add(self, outcome: "Outcome") -> None:
        """Count one example's outcome (skipped: why; kept: its truncations)."""
        if outcome.skipped == "too_long":
            self.dropped_too_long += 1
        elif outcome.skipped is not None:
            self.special_token_rows += outcome.skipped == "special"
            self.image_rows += outcome.skipped == "image"
            self.skip_messages.append(outcome.message)
        else:
            self.truncated_prompts += outcome.truncated_prompt
            self.truncated_responses += outcome.truncated_responses

    def as_dict(self) -> dict[str, int]:
        return {"examples": self.examples, "truncated_prompts": self.truncated_prompts,
                "truncated_responses": self.truncated_responses, "dropped_too_long": self.dropped_too_long,
                "rows_with_special_tokens": self.special_token_rows, "rows_with_unusable_images": self.image_rows}


@dataclass(frozen=True)
class VisionText:
    """What tokenizing rows with images needs: the model's processor, and its M-RoPE rule
    (None for models with 1-D positions)."""

    processor: object
    rope: object | None = None  # ppo_train.vision.RopeIndex

    def prompt(self, text: str, images: list, add_special_tokens: bool):
        """(ids, M-RoPE positions or None, rope delta, image tokens) of a rendered prompt."""
        from ppo_train.data.images import open_image

        opened = [open_image(r) for r in images or []]
        try:
            out = self.processor(text=[text], images=opened or None, add_special_tokens=add_special_tokens,
                                 return_tensors="pt")
        except ValueError as err:  # e.g. Qwen2-VL's smart_resize: an aspect ratio of 200 or more
            sizes = ", ".join(f"{im.width}x{im.height}" for im in opened)
            raise DataError(f"the processor cannot take the image(s) ({sizes}): {err}") from None
        ids = out["input_ids"][0].tolist()
        token = getattr(self.processor, "image_token_id", None)
        count = sum(1 for i in ids if i == token) if token is not None else 0
        if opened and not count:
            raise DataError("the processor put no image tokens in the prompt; is its image placeholder in the "
                            "chat template?")
        if self.rope is None:
            return ids, None, 0, count
        positions, delta = self.rope.prompt(ids, out.get("image_grid_thw"))
        return ids, positions, delta, count


def _render(tokenizer, example: PreferenceExample) -> tuple[str, list[str], bool]:
    """Return (prompt text, response texts, prompt_has_specials). `tokenizer` may be a
    processor (its chat template renders image parts)."""
    if not example.conversational:
        return example.prompt, list(example.responses), False
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"row {example.index}: conversational data needs a chat template, and the tokenizer has none; "
            "use a chat model's tokenizer (model.tokenizer) or string data")
    prompt = tokenizer.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
    responses = []
    for k, resp in enumerate(example.responses):
        full = tokenizer.apply_chat_template(example.prompt + resp, tokenize=False)
        if not full.startswith(prompt):
            raise DataError(
                f"row {example.index} response {k}: the chat template renders the prompt differently inside the "
                "whole conversation, so the prompt cannot be shared")
        responses.append(full[len(prompt):])
    return prompt, responses, True


def _response_ids(tokenizer, text: str) -> list[int]:
    eos_text, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if eos_text and text.rstrip().endswith(eos_text):
        text = text.rstrip()  # the template closed the turn with EOS: drop its trailing newline
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids or ids[-1] != eos_id:
        ids = ids + [eos_id]
    return ids


def _texts(example: PreferenceExample):
    """(field, text) of every piece of the row's text."""
    for name, value in [("prompt", example.prompt)] + [(f"responses[{k}]", r) for k, r in enumerate(example.responses)]:
        if isinstance(value, str):
            yield name, value
            continue
        for i, message in enumerate(value):
            content = message["content"]
            if isinstance(content, str):
                yield f"{name}[{i}].content", content
            else:
                for j, part in enumerate(content):
                    if part["type"] == "text":
                        yield f"{name}[{i}].content[{j}].text", part["text"]


def special_token_problem(example: PreferenceExample, specials: list[str]) -> str | None:
    for name, text in _texts(example):
        found = [(text.find(s), s) for s in specials if s in text]
        hit = min(found)[1] if found else None  # the first one in the text
        if hit is not None:
            return (f"{name}: holds the tokenizer's special token {hit!r}, which would be encoded as a control token "
                    "(a turn boundary, a role) instead of text")
    return None


def special_tokens(tokenizer) -> list[str]:
    """The tokenizer's special tokens as text, longest first (special_token_problem)."""
    found = {str(t) for t in tokenizer.all_special_tokens} | {
        str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    return [s for s in sorted(found, key=len, reverse=True) if s]


@dataclass
class Outcome:
    """What became of one example: tokenized (`example`), or skipped (`skipped` names why:
    special, image, too_long; `message` for the report), with the truncations it took."""

    example: TokenizedExample | None = None
    skipped: str | None = None
    message: str = ""
    truncated_prompt: bool = False
    truncated_responses: int = 0


def tokenize_one(ex: PreferenceExample, tokenizer, cfg: DictConfig, source: str, specials: list[str],
                 vision: VisionText | None = None) -> Outcome:
    """Tokenize one example under the length policy. Invalid under dataset.on_invalid=error: a
    DataError naming the file, row and field; under skip: an Outcome saying why it was skipped."""
    problem = special_token_problem(ex, specials)
    if problem:
        message = f"{source} row {ex.index}: {problem}"
        if cfg.on_invalid != "skip":
            raise DataError(f"{message}; remove it from the data (dataset.on_invalid=skip skips such rows and "
                            "counts them)")
        return Outcome(skipped="special", message=message)
    if ex.images and vision is None:
        raise DataError(f"{source} row {ex.index}: the row has images, and the model is a text model; "
                        "use a vision-language model (see model=tiny_llava) or data without images")
    prompt, responses, templated = _render(vision.processor if vision else tokenizer, ex)
    mrope, delta, image_tokens = None, 0, 0
    if vision is not None:
        try:
            prompt_ids, mrope, delta, image_tokens = vision.prompt(prompt, ex.images, not templated)
        except DataError as err:
            message = f"{source} row {ex.index}: {err}"
            if cfg.on_invalid != "skip":
                raise DataError(f"{message} (dataset.on_invalid=skip skips such rows and counts them)") from None
            return Outcome(skipped="image", message=message)
    else:
        prompt_ids = tokenizer(prompt, add_special_tokens=not templated)["input_ids"]
    response_ids = [_response_ids(tokenizer, r) for r in responses]
    if not prompt_ids:
        raise DataError(f"{source} row {ex.index}: the prompt tokenizes to nothing")
    out = Outcome()
    too_long_prompt = len(prompt_ids) > cfg.max_prompt_length
    too_long = [len(r) > cfg.max_response_length for r in response_ids]
    if too_long_prompt or any(too_long):
        if cfg.length_policy == "drop" or (too_long_prompt and image_tokens):
            return Outcome(skipped="too_long")
        if too_long_prompt:
            prompt_ids = prompt_ids[-cfg.max_prompt_length:]
            out.truncated_prompt = True
        out.truncated_responses = sum(too_long)
        response_ids = [r[: cfg.max_response_length] for r in response_ids]
    out.example = TokenizedExample(ex.index, prompt_ids, response_ids, list(ex.pairs), ex.scores, ex.images, mrope,
                                   delta, image_tokens)
    return out


def check_tokenizer(tokenizer) -> None:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; responses must end in EOS (set tokenizer.eos_token)")


def no_examples_left(report: TokenizeReport) -> DataError:
    return DataError(
        f"no examples left after the length policy ({report.dropped_too_long} dropped as too long); "
        "raise dataset.max_prompt_length / max_response_length or use dataset.length_policy=truncate")


def tokenize_examples(examples: list[PreferenceExample], tokenizer, cfg: DictConfig,
                      source: str | None = None, vision: VisionText | None = None
                      ) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenize a list of examples in this process (the store, data/store.py, does the same per
    row in parallel workers)."""
    check_tokenizer(tokenizer)
    report, specials, out = TokenizeReport(), special_tokens(tokenizer), []
    for ex in examples:
        outcome = tokenize_one(ex, tokenizer, cfg, source or cfg.path, specials, vision)
        report.add(outcome)
        if outcome.example is not None:
            out.append(outcome.example)
    report.examples = len(out)
    if not out:
        raise no_examples_left(report)
    return out, report
