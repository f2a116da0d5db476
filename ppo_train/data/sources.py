"""Load preference rows (local .jsonl/.json/.parquet or a hub dataset) and normalize them.

Every row becomes a `PreferenceExample`: one prompt, N >= 2 responses and the preferred
pairs among them. Accepted formats (TRL's names):

- preference: `prompt`, `chosen`, `rejected` as strings, or as message lists
  (`[{"role": ..., "content": ...}]`, the prompt holding the turns before the answer);
- implicit: `chosen` and `rejected` only, two whole conversations sharing their leading
  turns. As message lists the shared leading messages are the prompt; as strings
  (HH-RLHF transcripts) the prompt ends at the last `response_marker` inside the common
  prefix (the marker stays in the prompt);
- sharegpt: `conversations` (`from`/`value` turns) plus `chosen` and `rejected` messages
  (LLaMA-Factory's format), roles mapped human->user, gpt->assistant;
- scored: `prompt`, `responses` (or `completions`), `scores` (higher = better);
- ultrafeedback: openbmb/UltraFeedback's raw rows, `instruction` and `completions`, a list
  of `{"response": ..., "overall_score": ...}` (the score used);
- ranked: `prompt`, `responses`, `ranks` (0 = best);
- pandalm: `instruction`, `input`, `response1`, `response2`, `annotator1..3` (1 or 2 = that
  response is better, 0 = tie); the majority of the annotators decides, a draw is a tie;
- unpaired (TRL's KTO format): `prompt`, `completion`, `label` (true = desirable): one response,
  no pair, the label kept as its score; only `loss=kto` trains on it (data/kto.py).

Images (vision-language models, TRL's vision format): an `images` column beside any of the
conversational formats above, one entry per `{"type": "image"}` part of the prompt's messages,
in order (see `ppo_train.data.images` for the accepted kinds). A message's content may be a list of
`{"type": "text", "text": ...}` and `{"type": "image"}` parts; a list without image parts is
joined into one string, so text-only chat templates read it. A missing, undecodable or empty
image makes the row invalid (`dataset.on_invalid`), like any bad field.

Lists keep their first `dataset.max_responses` responses. Preferences are all ordered pairs
with strictly different scores; tied pairs are dropped and counted, and a row whose
responses are all tied has no preference at all (an invalid row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from omegaconf import DictConfig

from ppo_train.data.jsoncheck import INVALID, checked_path
from ppo_train.errors import DataError
from ppo_train.fileio import is_local_path

Text = Union[str, list]  # a string, or a list of {"role", "content"} messages


class TiedRowError(DataError):
    """A list whose responses all have the same score: no preference to learn."""


@dataclass
class PreferenceExample:
    index: int  # row number in the source (0-based)
    prompt: Text
    responses: list[Text]
    pairs: list[tuple[int, int]]  # (preferred, dispreferred) indices into responses
    scores: list[float] | None = None
    images: list | None = None  # image references (ppo_train.data.images.image_ref) of the prompt, in order

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class LoadReport:
    source: str
    rows: int = 0
    kept: int = 0
    skipped: int = 0  # invalid rows skipped under dataset.on_invalid=skip
    skip_messages: list[str] = field(default_factory=list)
    tied_pairs: int = 0  # pairs of a list dropped because their scores are equal
    tied_rows: int = 0  # of the skipped rows: all responses tied
    capped_responses: int = 0  # responses beyond dataset.max_responses


def load_rows(cfg: DictConfig, path: str | None = None):
    """Return a `datasets.Dataset` for `path` (default dataset.path): a local file or a hub id."""
    import datasets

    path = path or cfg.path
    local = Path(path).expanduser()
    if is_local_path(path):
        if local.is_dir():
            raise DataError(f"dataset.path={path!r} is a folder; give one .jsonl, .json or .parquet file in it")
        if not local.is_file():
            raise DataError(f"dataset.path={path!r}: file not found; give a .jsonl, .json or .parquet file or a hub dataset id")
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(local.suffix)
        if kind is None:
            raise DataError(f"dataset.path={path!r}: unsupported file type {local.suffix!r}; expected .jsonl, .json or .parquet")
        if kind == "json":  # bad bytes, bad JSON, lone surrogates: named by line and row here
            if _blank(local):
                raise DataError(f"dataset.path={path!r}: the file is empty (no rows)")
            local = checked_path(local.resolve(), cfg.on_invalid)
        ds = datasets.load_dataset(kind, data_files=str(local.resolve()), split="train")
    else:
        ds = _load_hub(datasets, path, cfg)
    if cfg.num_rows is not None:
        ds = ds.select(range(min(cfg.num_rows, len(ds))))
    return ds


def _blank(path: Path) -> bool:
    """True if the file holds nothing but whitespace (read until the first other byte)."""
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            if chunk.strip():
                return False
    return True


def _load_hub(datasets, path: str, cfg: DictConfig):
    """A hub dataset; an id that cannot be found or reached is one DataError naming it."""
    try:
        return datasets.load_dataset(path, cfg.name, split=cfg.split)
    except (FileNotFoundError, ConnectionError, ValueError, OSError) as err:
        offline = " (no network: the hub cannot be reached from here)" if "offline" in str(err).lower() or isinstance(
            err, ConnectionError) else ""
        raise DataError(f"dataset.path={path!r}: not a local file and not a hub dataset that can be loaded{offline}: "
                        f"{type(err).__name__}: {str(err).splitlines()[0][:300]}") from err


def detect_format(columns: list[str], source: str) -> str:
    cols = set(columns)
    if "conversations" in cols and {"chosen", "rejected"} <= cols:
        return "sharegpt"
    if {"instruction", "response1", "response2", "annotator1"} <= cols:
        return "pandalm"
    if {"instruction", "completions"} <= cols:
        return "ultrafeedback"
    if "prompt" in cols and cols & {"responses", "completions"}:
        if "scores" in cols:
            return "scored"
        if "ranks" in cols:
            return "ranked"
    if {"prompt", "completion", "label"} <= cols:
        return "unpaired"
    if {"prompt", "chosen", "rejected"} <= cols:
        return "preference"
    if {"chosen", "rejected"} <= cols:
        return "implicit"
    raise DataError(
        f"{source}: cannot tell the format from the columns {sorted(cols)}; expected prompt/chosen/rejected, "
        "chosen/rejected (implicit prompt), conversations/chosen/rejected (sharegpt), prompt/responses/scores "
        "(scored), prompt/responses/ranks (ranked), instruction/response1/response2/annotator1 (pandalm) or "
        "prompt/completion/label (unpaired, loss=kto)"
    )


ROLES = {"system", "user", "assistant", "tool"}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "observation": "tool", "function_call": "assistant", "tool": "tool"}


def _messages(value: Any, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a string or a non-empty list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if isinstance(m, dict) and "role" in m and "content" in m:
            role, content = m["role"], m["content"]
            if role not in ROLES:
                raise DataError(f"{where}[{i}].role: unknown role {role!r}; expected one of {sorted(ROLES)}")
        elif isinstance(m, dict) and "from" in m and "value" in m:
            role, content = _SHAREGPT_ROLES.get(m["from"]), m["value"]
            if role is None:
                raise DataError(f"{where}[{i}]: unknown role {m['from']!r}; expected one of {sorted(_SHAREGPT_ROLES)}")
        else:
            raise DataError(f"{where}[{i}]: expected {{'role', 'content'}} or {{'from', 'value'}}, got {m!r:.80}")
        out.append({"role": role, "content": _content(content, f"{where}[{i}].content")})
    return out


def _content(content: Any, where: str) -> str | list[dict]:
    """A message's content: a string, or a list of text and image parts (kept as a list only
    when it holds an image)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(f"{where}: expected a string or a list of parts, got {type(content).__name__}")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            parts.append({"type": "image"})
        else:
            raise DataError(f"{where}[{j}]: expected {{'type': 'text', 'text': ...}} or {{'type': 'image'}}, "
                            f"got {part!r:.80}")
    if not any(p["type"] == "image" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def image_parts(text: Text) -> int:
    """The number of {"type": "image"} parts in a message list (0 for a string)."""
    if isinstance(text, str):
        return 0
    return sum(1 for m in text if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image")


def _images(row: dict, prompt: Text, responses: list[Text], where: str, base_dir: Path | None) -> list | None:
    """The row's image references, checked against the image parts of its messages."""
    from ppo_train.data.images import image_ref

    values = row.get("images")
    values = [] if values is None else values
    if not isinstance(values, (list, tuple)):
        values = [values]
    for k, resp in enumerate(responses):
        if image_parts(resp):
            raise DataError(f"{where}: response {k} holds an image part; images belong to the prompt")
    wanted = image_parts(prompt)
    if len(values) != wanted:
        if isinstance(prompt, str) and values:
            raise DataError(f"{where}: a row with images needs its prompt as messages with {{'type': 'image'}} parts")
        raise DataError(f"{where}: {len(values)} image(s) in 'images' but {wanted} image part(s) in the prompt")
    return [image_ref(v, f"{where}.images[{i}]", base_dir) for i, v in enumerate(values)] or None


def _text(value: Any, where: str) -> Text:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: empty text")
        return value
    if isinstance(value, dict):  # a single message (LLaMA-Factory chosen/rejected)
        value = [value]
    return _messages(value, where)


def split_implicit(chosen: Text, rejected: Text, marker: str, where: str) -> tuple[Text, Text, Text]:
    """Split two whole conversations into (prompt, chosen answer, rejected answer)."""
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise DataError(f"{where}: chosen and rejected must both be strings or both message lists")
    if isinstance(chosen, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise DataError(f"{where}: chosen and rejected share no leading message, so there is no prompt")
        if n == len(chosen) or n == len(rejected):
            raise DataError(f"{where}: chosen and rejected are identical or one is a prefix of the other")
        prompt, a, b = chosen[:n], chosen[n:], rejected[n:]
        for name, resp in (("chosen", a), ("rejected", b)):
            if resp[-1]["role"] != "assistant":
                raise DataError(f"{where}.{name}: the last message must be an assistant turn, got {resp[-1]['role']!r}")
        return prompt, a, b
    common = 0
    limit = min(len(chosen), len(rejected))
    while common < limit and chosen[common] == rejected[common]:
        common += 1
    cut = chosen.rfind(marker, 0, common)
    if cut < 0:
        raise DataError(f"{where}: no {marker!r} in the common prefix of chosen and rejected (dataset.response_marker)")
    cut += len(marker)
    prompt, a, b = chosen[:cut], chosen[cut:], rejected[cut:]
    if not a.strip() or not b.strip():
        raise DataError(f"{where}: empty chosen or rejected answer after the prompt")
    return prompt, a, b


REQUIRED = {"preference": ("prompt", "chosen", "rejected"), "implicit": ("chosen", "rejected"),
            "sharegpt": ("conversations", "chosen", "rejected"), "scored": ("prompt", "scores"),
            "ranked": ("prompt", "ranks"), "pandalm": ("instruction", "response1", "response2", "annotator1"),
            "ultrafeedback": ("instruction", "completions"), "unpaired": ("prompt", "completion", "label")}


def resolve_format(fmt: str, columns: list[str], source: str) -> str:
    """`dataset.format` against the file's columns: auto detects; an explicit format whose columns
    the file lacks is refused in one line, naming the format the columns read as (a recipe's
    bundled dataset sets its format, which a user's own `dataset.path` need not share)."""
    columns = [c for c in columns if c != INVALID]
    if fmt == "auto":
        return detect_format(columns, source)
    missing = [c for c in REQUIRED[fmt] if c not in columns]
    if missing:
        raise DataError(f"{source}: dataset.format={fmt} expects the columns {list(REQUIRED[fmt])}, but the file "
                        f"lacks {missing}{format_hint(fmt, columns) or '; see the README for the formats'}")
    return fmt


def format_hint(fmt: str, columns: list[str]) -> str:
    """'; its columns read as format X: ...' when an explicit format differs from what the
    columns read as ('' otherwise): said when no row of a file is valid (an explicit format may
    differ on purpose: implicit over conversations that also have a `prompt` column)."""
    try:
        detected = detect_format([c for c in columns if c != INVALID], "")
    except DataError:
        return ""
    return "" if detected == fmt else f"; its columns read as format {detected!r}: set dataset.format={detected} or auto"


def pairs_from_scores(scores: list[float]) -> tuple[list[tuple[int, int]], int]:
    """All ordered pairs (better, worse) with strictly different scores, and the tie count."""
    pairs, ties = [], 0
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            if scores[i] > scores[j]:
                pairs.append((i, j))
            elif scores[j] > scores[i]:
                pairs.append((j, i))
            else:
                ties += 1
    return pairs, ties


def _is_number(x) -> bool:
    """A finite int or float (not a bool, not NaN: NaN compares false with everything, so a NaN
    score would quietly turn into ties)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _scored_row(row: dict, fmt: str, where: str) -> tuple[Text, list[Text], list[float]]:
    if fmt == "pandalm":
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        responses = [_text(row["response1"], f"{where}.response1"), _text(row["response2"], f"{where}.response2")]
        votes = [row.get(f"annotator{i}") for i in (1, 2, 3) if row.get(f"annotator{i}") is not None]
        if any(v not in (0, 1, 2) for v in votes):
            raise DataError(f"{where}.annotator: expected 0 (tie), 1 or 2, got {votes}")
        scores = [float(votes.count(1)), float(votes.count(2))]
        return _text(prompt, f"{where}.instruction"), responses, scores
    if fmt == "ultrafeedback":
        items = row["completions"]
        if not isinstance(items, list) or not all(isinstance(c, dict) for c in items):
            raise DataError(f"{where}.completions: expected a list of {{'response', 'overall_score'}} objects")
        for i, c in enumerate(items):
            if not _is_number(c.get("overall_score")):
                raise DataError(f"{where}.completions[{i}].overall_score: expected a finite number, "
                                f"got {c.get('overall_score')!r}")
        responses = [_text(c.get("response"), f"{where}.completions[{i}].response") for i, c in enumerate(items)]
        return _text(row["instruction"], f"{where}.instruction"), responses, [float(c["overall_score"]) for c in items]
    key = "responses" if row.get("responses") is not None else "completions"
    values = row.get(key)
    if not isinstance(values, list) or len(values) < 2:
        raise DataError(f"{where}.{key}: expected a list of at least 2 responses")
    responses = [_text(v, f"{where}.{key}[{i}]") for i, v in enumerate(values)]
    raw = row["scores"] if fmt == "scored" else row["ranks"]
    field_name = "scores" if fmt == "scored" else "ranks"
    if not isinstance(raw, list) or len(raw) != len(responses) or not all(_is_number(x) for x in raw):
        raise DataError(f"{where}.{field_name}: expected {len(responses)} finite numbers, one per response, "
                        f"got {raw!r:.200}")
    scores = [float(x) for x in raw] if fmt == "scored" else [-float(x) for x in raw]
    return _text(row["prompt"], f"{where}.prompt"), responses, scores


def normalize_row(row: dict, index: int, fmt: str, cfg: DictConfig, source: str,
                  report: LoadReport | None = None) -> PreferenceExample:
    where = f"{source} row {index}"
    base_dir = Path(source).expanduser().resolve().parent if is_local_path(source) else None
    if row.get(INVALID):  # a line that jsoncheck replaced: its message names file, row and line
        raise DataError(row[INVALID])
    for key in REQUIRED[fmt]:
        if row.get(key) is None:
            raise DataError(f"{where}: missing field {key!r}")
    if fmt in ("scored", "ranked", "pandalm", "ultrafeedback"):
        prompt, responses, scores = _scored_row(row, fmt, where)
        cap = cfg.get("max_responses")
        if cap is not None and len(responses) > cap:
            if report is not None:
                report.capped_responses += len(responses) - cap
            responses, scores = responses[:cap], scores[:cap]
        pairs, ties = pairs_from_scores(scores)
        if not pairs:
            raise TiedRowError(f"{where}: all {len(responses)} responses are tied ({field_label(fmt)}), no preference")
        if report is not None:
            report.tied_pairs += ties
        if isinstance(prompt, str) and isinstance(responses[0], list):
            prompt = [{"role": "user", "content": prompt}]
        return PreferenceExample(index=index, prompt=prompt, responses=responses, pairs=pairs, scores=scores,
                                 images=_images(row, prompt, responses, where, base_dir))
    if fmt == "unpaired":
        return _unpaired_row(row, index, where, base_dir)
    if fmt == "implicit":
        prompt, chosen, rejected = split_implicit(
            _text(row["chosen"], f"{where}.chosen"), _text(row["rejected"], f"{where}.rejected"),
            cfg.response_marker, where)
    elif fmt == "sharegpt":
        prompt = _messages(row["conversations"], f"{where}.conversations")
        chosen = _text(row["chosen"], f"{where}.chosen")
        rejected = _text(row["rejected"], f"{where}.rejected")
    else:
        prompt = _text(row["prompt"], f"{where}.prompt")
        chosen = _text(row["chosen"], f"{where}.chosen")
        rejected = _text(row["rejected"], f"{where}.rejected")
        if isinstance(prompt, str) and isinstance(chosen, list):
            prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) != isinstance(chosen, list) or isinstance(chosen, list) != isinstance(rejected, list):
        raise DataError(f"{where}: prompt, chosen and rejected mix strings and message lists")
    if isinstance(chosen, list):
        for name, resp in (("chosen", chosen), ("rejected", rejected)):
            if resp[-1]["role"] != "assistant":
                raise DataError(f"{where}.{name}: no final assistant turn (the last message is {resp[-1]['role']!r})")
    if chosen == rejected:
        raise DataError(f"{where}: chosen is identical to rejected")
    return PreferenceExample(index=index, prompt=prompt, responses=[chosen, rejected], pairs=[(0, 1)],
                             images=_images(row, prompt, [chosen, rejected], where, base_dir))


def _unpaired_row(row: dict, index: int, where: str, base_dir) -> PreferenceExample:
    """TRL's unpaired (KTO) row: one completion, no pair, its label as its score (1 or 0)."""
    label = row["label"]
    if not (isinstance(label, bool) or (_is_number(label) and label in (0, 1))):
        raise DataError(f"{where}.label: expected true or false (desirable or not), got {label!r:.80}")
    prompt = _text(row["prompt"], f"{where}.prompt")
    completion = _text(row["completion"], f"{where}.completion")
    if isinstance(prompt, str) and isinstance(completion, list):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) != isinstance(completion, list):
        raise DataError(f"{where}: prompt and completion mix strings and message lists")
    if isinstance(completion, list) and completion[-1]["role"] != "assistant":
        raise DataError(f"{where}.completion: no final assistant turn (the last message is "
                        f"{completion[-1]['role']!r})")
    return PreferenceExample(index=index, prompt=prompt, responses=[completion], pairs=[],
                             scores=[1.0 if label else 0.0], images=_images(row, prompt, [completion], where, base_dir))


def field_label(fmt: str) -> str:
    return {"scored": "scores", "ranked": "ranks", "pandalm": "annotator votes", "ultrafeedback": "overall_score"}[fmt]


def load_examples(cfg: DictConfig, path: str | None = None) -> tuple[list[PreferenceExample], LoadReport]:
    from ppo_train.data.images import set_pixel_limit

    set_pixel_limit(cfg.max_image_pixels)
    ds = load_rows(cfg, path)
    source = str(path or cfg.path)
    fmt = resolve_format(str(cfg.format), ds.column_names, source)
    report = LoadReport(source=source, rows=len(ds))
    examples = []
    for i, row in enumerate(ds):
        try:
            examples.append(normalize_row(row, i, fmt, cfg, source, report))
        except DataError as err:
            if cfg.on_invalid != "skip":
                raise DataError(f"{err} (dataset.on_invalid=skip skips such rows and counts them)") from None
            report.skipped += 1
            report.tied_rows += isinstance(err, TiedRowError)
            report.skip_messages.append(str(err))
    if not examples:
        first = f"; the first: {report.skip_messages[0]}" if report.skip_messages else ""
        raise DataError(f"{source}: no valid rows ({report.rows} rows, {report.skipped} invalid{first})"
                        f"{format_hint(fmt, ds.column_names)}")
    report.kept = len(examples)
    return examples, report
