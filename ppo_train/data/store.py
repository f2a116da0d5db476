"""The tokenized store: a file's rows normalized and tokenized once, kept as Arrow files that
every later start (resumes included) and every rank of a machine memory-maps.

Built with `datasets` (`Dataset.map(batched=True, num_proc=dataset.num_proc)`): each worker
normalizes and tokenizes its rows (`sources.normalize_row`, `tokenize.tokenize_one`, the code
of the in-process path) and writes, per source row, its outcome (kept, or why it was skipped,
with the message), its truncations and counts, and for a kept row its tokens as int32: the
prompt, the responses back to back with their lengths, the pairs, the scores, the image
references (path or bytes) with their digest, the M-RoPE positions. The reports of a start
are sums over these columns, so a start that reads the store reports what the build saw.

The store's key covers everything that changes its contents: the file's identity (resolved
path, size and modification time; a hub dataset's `datasets` fingerprint, which follows its
revision), the tokenizer (its vocabulary, merges and normalizers as serialized, special
tokens, chat template), a vision-language model's processor and position rule, and the
dataset keys that change tokens or validity (format, response_marker, num_rows, the length
limits and policy, max_responses, on_invalid, max_image_pixels, name, split). Another key is
another folder: nothing stale is read. Images referenced by path are checked on every start
(size and modification time, as in the digest); a changed image rebuilds the store.

A folder is complete when its `meta.json` is: the build writes into a temporary folder and
renames it into place, so an interrupted build leaves nothing that could be read. A shard
whose size differs from the one recorded, or that Arrow cannot read, is rebuilt with a warning.

Location: `dataset.cache_dir` if set, else `<HF datasets cache>/pptrain` (by default
~/.cache/huggingface/datasets/pptrain; HF_DATASETS_CACHE or HF_HOME move it). One folder per
store, named after the file and the key; deleting the folders is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ppo_train.data.examples import Examples, ragged_take
from ppo_train.data.images import image_digest
from ppo_train.data.sources import (
    LoadReport, TiedRowError, format_hint, load_rows, normalize_row, resolve_format,
)
from ppo_train.data.tokenize import (
    TokenizedExample, TokenizeReport, VisionText, check_tokenizer, no_examples_left, special_tokens, tokenize_one,
)
from ppo_train.errors import DataError
from ppo_train.fileio import is_local_path

VERSION = 1
# outcome of a row
KEPT, INVALID_ROW, TIED_ROW, SPECIAL, IMAGE, TOO_LONG = range(6)
SKIPPED = {"special": SPECIAL, "image": IMAGE, "too_long": TOO_LONG}
# dataset keys that change the store's contents (the rest: splits, eval, cache settings)
CONTENT_KEYS = ("format", "response_marker", "num_rows", "max_prompt_length", "max_response_length",
                "length_policy", "max_responses", "on_invalid", "max_image_pixels", "name", "split")
ROWS_PER_PROCESS = 2000  # fewer rows than this per worker: a process costs more than it saves


def _features():
    from datasets import Features, List, Value

    return Features({
        "row": Value("int64"), "status": Value("int8"), "message": Value("string"),
        "tied_pairs": Value("int32"), "capped": Value("int32"),
        "truncated_prompt": Value("bool"), "truncated_responses": Value("int32"),
        "prompt_ids": List(Value("int32")), "response_ids": List(Value("int32")),
        "response_lengths": List(Value("int32")), "pairs": List(Value("int32")), "scores": List(Value("float64")),
        "image_paths": List(Value("string")), "image_bytes": List(Value("binary")), "image_digest": Value("binary"),
        "mrope": List(Value("int32")), "rope_delta": Value("int32"), "image_tokens": Value("int32"),
    })


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cache_root(setting: str | None) -> Path:
    if setting:
        return Path(setting).expanduser()
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "pptrain"


# -- the key ------------------------------------------------------------------------------------

def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def tokenizer_identity(tokenizer) -> dict:
    """What decides how a tokenizer encodes text: its serialized pipeline (vocabulary, merges,
    normalizer, pre-tokenizer, post-processor, added tokens) or, for a slow tokenizer, its
    vocabulary; the special tokens and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return {"class": type(tokenizer).__name__, "pipeline": _sha(body), "size": len(tokenizer),
            "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id],
            "add": [getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)],
            "chat_template": _sha(str(getattr(tokenizer, "chat_template", None)))}


def vision_identity(vision: VisionText | None) -> dict | None:
    if vision is None:
        return None
    p = vision.processor
    image = getattr(p, "image_processor", None)
    rope = vision.rope.model.config.to_json_string() if vision.rope is not None else None
    return {"class": type(p).__name__, "image_processor": _sha(image.to_json_string()) if image is not None else None,
            "chat_template": _sha(str(getattr(p, "chat_template", None))), "rope": _sha(rope) if rope else None,
            "tokenizer": tokenizer_identity(p.tokenizer) if getattr(p, "tokenizer", None) is not None else None}


def source_identity(d: DictConfig, path: str) -> dict:
    """A local file by resolved path, size and modification time; a hub dataset by id and the
    `datasets` fingerprint of what it loads (its revision's files)."""
    if is_local_path(path):
        local = Path(path).expanduser().resolve()
        if local.is_file():
            stat = local.stat()
            return {"path": str(local), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        return {"path": str(local)}  # load_rows names what is wrong with it
    return {"hub": path, "fingerprint": load_rows(d, path)._fingerprint}


def store_key(d: DictConfig, path: str, tokenizer, vision: VisionText | None) -> tuple[str, dict]:
    parts = {"version": VERSION, "source": source_identity(d, path),
             "dataset": {k: OmegaConf.to_container(d, resolve=True).get(k) for k in CONTENT_KEYS},
             "tokenizer": tokenizer_identity(tokenizer), "vision": vision_identity(vision)}
    parts["dataset"] = {k: (str(v) if v is not None else None) for k, v in parts["dataset"].items()}
    return _sha(json.dumps(parts, sort_keys=True, default=str)), parts


# -- the build (one worker's batch) --------------------------------------------------------------

def _image_columns(images) -> tuple[list, list, bytes]:
    paths, blobs = [], []
    for ref in images or []:
        if isinstance(ref, str):
            paths.append(ref)
            blobs.append(None)
        else:
            if not isinstance(ref, bytes):  # a PIL image (a decoded column): kept as PNG
                import io

                buffer = io.BytesIO()
                ref.save(buffer, format="PNG")
                ref = buffer.getvalue()
            paths.append(None)
            blobs.append(ref)
    return paths, blobs, image_digest(images or [])


def _process(batch: dict, indices: list[int], fmt: str, d: DictConfig, source: str, tokenizer,
             vision: VisionText | None, specials: list[str]) -> dict:
    from ppo_train.data.images import set_pixel_limit

    set_pixel_limit(d.max_image_pixels)  # this process's PIL (a worker's own, under spawn)
    names = list(batch)
    out = {k: [] for k in _features()}
    for values, index in zip(zip(*(batch[n] for n in names)), indices):
        row = dict(zip(names, values))
        counted = LoadReport(source)
        status, message, outcome = KEPT, "", None
        try:
            example = normalize_row(row, index, fmt, d, source, counted)
        except DataError as err:
            if d.on_invalid != "skip":
                raise DataError(f"{err} (dataset.on_invalid=skip skips such rows and counts them)") from None
            status, message = (TIED_ROW if isinstance(err, TiedRowError) else INVALID_ROW), str(err)
        if status == KEPT:
            outcome = tokenize_one(example, tokenizer, d, source, specials, vision)
            if outcome.skipped is not None:
                status, message = SKIPPED[outcome.skipped], outcome.message
        ex: TokenizedExample | None = outcome.example if outcome is not None else None
        paths, blobs, digest = _image_columns(ex.images if ex is not None else None)
        out["row"].append(index)
        out["status"].append(status)
        out["message"].append(message)
        out["tied_pairs"].append(counted.tied_pairs)
        out["capped"].append(counted.capped_responses)
        out["truncated_prompt"].append(bool(outcome is not None and outcome.truncated_prompt))
        out["truncated_responses"].append(outcome.truncated_responses if outcome is not None else 0)
        out["prompt_ids"].append(list(ex.prompt_ids) if ex else [])
        out["response_ids"].append([t for r in ex.response_ids for t in r] if ex else [])
        out["response_lengths"].append([len(r) for r in ex.response_ids] if ex else [])
        out["pairs"].append([int(i) for pair in ex.pairs for i in pair] if ex else [])
        out["scores"].append(list(ex.scores) if ex is not None and ex.scores is not None else [])
        out["image_paths"].append(paths)
        out["image_bytes"].append(blobs)
        out["image_digest"].append(digest if paths else b"")
        out["mrope"].append(np.asarray(ex.mrope).reshape(-1).tolist() if ex is not None and ex.mrope is not None
                            else [])
        out["rope_delta"].append(int(ex.rope_delta) if ex else 0)
        out["image_tokens"].append(int(ex.image_tokens) if ex else 0)
    return out


def _decode_images(ds):
    """Image columns read as {bytes, path} (not decoded into PIL images): the store keeps the bytes."""
    from datasets import Image, List, Sequence

    feature = ds.features.get("images")
    if isinstance(feature, Image):
        return ds.cast_column("images", Image(decode=False))
    if isinstance(feature, (List, Sequence)) and isinstance(feature.feature, Image):
        return ds.cast_column("images", List(Image(decode=False)))
    return ds


def _build(d: DictConfig, path: str, folder: Path, key: str, parts: dict, tokenizer, vision, num_proc: int) -> None:

    ds = _decode_images(load_rows(d, path))  # images are opened by _process, under its pixel limit
    fmt = resolve_format(str(d.format), ds.column_names, path)
    procs = 1 if vision is not None else max(1, min(num_proc, len(ds) // ROWS_PER_PROCESS))
    tmp = folder.with_name(f"{folder.name}.tmp-{os.uname().nodename}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if procs > 1:  # the workers are the parallelism (and a tokenizer used before a fork warns)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    began = time.perf_counter()
    try:
        with _quiet():
            out = ds.map(_process, batched=True, batch_size=200, with_indices=True, num_proc=procs if procs > 1 else None,
                         remove_columns=ds.column_names, features=_features(), new_fingerprint=key[:32],
                         load_from_cache_file=False, cache_file_name=str(tmp / "tokens.arrow"),
                         fn_kwargs=dict(fmt=fmt, d=d, source=str(path), tokenizer=tokenizer, vision=vision,
                                        specials=special_tokens(tokenizer)))
        tokenized = time.perf_counter() - began
        files = sorted(f.name for f in tmp.glob("*.arrow"))
        meta = {"key": key, "parts": parts, "rows": len(out), "format": fmt, "processes": procs,
                "format_hint": format_hint(fmt, ds.column_names),
                "tokenize_seconds": round(tokenized, 3), "digest": content_digest(out),
                "files": {f: (tmp / f).stat().st_size for f in files}}
        meta["seconds"] = round(time.perf_counter() - began, 3)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        del out
        try:
            tmp.rename(folder)
        except OSError:  # another process (another node on a shared disk) built it first
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _quiet():
    """datasets' progress bars off while it works for the store, when stderr is not a terminal
    (logs, tests): one line per start says what happened instead."""
    from datasets.utils import logging

    was = logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def content_digest(ds) -> str:
    """Identifies the store's contents independently of how it was sharded: per column, the
    row lengths and the values, each hashed as one stream over the chunks."""
    table = ds.data
    streams = {}
    for name in ("row", "status", "prompt_ids", "response_ids", "response_lengths", "pairs", "image_digest",
                 "image_bytes", "image_paths", "mrope", "rope_delta"):
        for chunk in table.column(name).chunks:
            for part, data in _parts(chunk):
                streams.setdefault((name, part), hashlib.sha256()).update(data)
    h = hashlib.sha256()
    for (name, part), stream in sorted(streams.items()):
        h.update(f"{name}.{part}:{stream.hexdigest()}".encode())
    return h.hexdigest()


def _parts(chunk):
    """(stream, bytes) pieces of one chunk: list lengths and values; variable-size values
    (paths, image bytes) each with its length."""
    import pyarrow as pa

    if pa.types.is_list(chunk.type):
        off = chunk.offsets.to_numpy()
        yield "lengths", np.diff(off).astype(np.int64).tobytes()
        chunk = chunk.values.slice(int(off[0]), int(off[-1] - off[0]))
    if pa.types.is_primitive(chunk.type):
        yield "values", chunk.to_numpy(zero_copy_only=False).tobytes()
        return
    for value in chunk.to_pylist():
        data = value.encode() if isinstance(value, str) else (value or b"")
        yield "values", (len(data) if value is not None else -1).to_bytes(8, "little", signed=True) + data


def _lengths(offsets: list[np.ndarray]) -> np.ndarray:
    """Per-row list lengths from each chunk's offsets."""
    return np.concatenate([np.diff(o) for o in offsets] or [np.zeros(0, np.int64)]).astype(np.int64)


def _list_lengths(column) -> np.ndarray:
    """Per-row lengths of a list column, without reading its values."""
    return _lengths([c.offsets.to_numpy() for c in column.chunks])


# -- reading ----------------------------------------------------------------------------------

class _ListColumn:
    """A list<primitive> column of memory-mapped chunks: row -> numpy view of its values."""

    def __init__(self, column):
        self.starts = np.cumsum([0] + [len(c) for c in column.chunks])
        self.offsets = [c.offsets.to_numpy() for c in column.chunks]
        self.values = [c.values.to_numpy(zero_copy_only=False) for c in column.chunks]

    def __getitem__(self, row: int) -> np.ndarray:
        c = int(np.searchsorted(self.starts, row, side="right")) - 1
        off, i = self.offsets[c], row - self.starts[c]
        return self.values[c][off[i]:off[i + 1]]

    def lengths(self) -> np.ndarray:
        return _lengths(self.offsets)

    def flat(self) -> np.ndarray:
        return np.concatenate([v[o[0]:o[-1]] for o, v in zip(self.offsets, self.values)]
                              or [np.zeros(0, np.int32)]).astype(np.int64)


class StoreRows:
    """The kept rows of a store (Rows protocol of data/examples.py)."""

    def __init__(self, ds, digest: str):
        table = ds.data
        self.ds, self._digest = ds, digest
        status = table.column("status").to_numpy()
        self.kept = np.flatnonzero(status == KEPT).astype(np.int64)
        self._prompt = _ListColumn(table.column("prompt_ids"))
        self._responses = _ListColumn(table.column("response_ids"))
        self._lengths = _ListColumn(table.column("response_lengths"))
        self._pairs = _ListColumn(table.column("pairs"))
        self._scores = _ListColumn(table.column("scores"))
        self._mrope = _ListColumn(table.column("mrope"))
        self._images = table.column("image_paths"), table.column("image_bytes")
        self._delta = table.column("rope_delta").to_numpy()
        self.source_index = table.column("row").to_numpy().astype(np.int64)[self.kept]
        self.prompt_lengths = self._prompt.lengths()[self.kept]
        per_row = self._lengths.lengths()
        self.response_offsets = np.concatenate(([0], np.cumsum(per_row[self.kept]))).astype(np.int64)
        self.response_lengths = ragged_take(self._lengths.flat(), np.concatenate(([0], np.cumsum(per_row))),
                                            self.kept)
        self.pair_counts = self._pairs.lengths()[self.kept] // 2
        self.image_counts = _list_lengths(table.column("image_paths"))[self.kept]
        self.image_token_counts = table.column("image_tokens").to_numpy().astype(np.int64)[self.kept]

    def __len__(self) -> int:
        return int(self.kept.shape[0])

    @cached_property
    def chosen_token_counts(self) -> np.ndarray:
        """(n,) the preferred response's tokens summed over each kept row's pairs, from the pair
        and length columns (no row is read)."""
        per_row = self._lengths.lengths()
        first = np.concatenate(([0], np.cumsum(per_row)))[:-1]  # each row's first response, flat
        pairs = self._pairs.flat()
        row_of_pair = np.repeat(np.arange(per_row.shape[0]), self._pairs.lengths() // 2)
        tokens = self._lengths.flat()[first[row_of_pair] + pairs[0::2]]
        counts = np.bincount(row_of_pair, weights=tokens, minlength=per_row.shape[0])
        return counts.astype(np.int64)[self.kept]

    def get(self, i: int) -> TokenizedExample:
        r = int(self.kept[i])
        lengths = self._lengths[r]
        flat = self._responses[r]
        ends = np.cumsum(lengths)
        responses = [flat[e - n:e].tolist() for e, n in zip(ends, lengths)]
        pairs = [tuple(p) for p in self._pairs[r].reshape(-1, 2).tolist()]
        scores = self._scores[r].tolist() or None
        mrope = self._mrope[r]
        images = None
        if self.image_counts[i]:
            paths, blobs = (c[r].as_py() for c in self._images)
            images = [p if p is not None else b for p, b in zip(paths, blobs)]
        prompt = self._prompt[r].tolist()  # lists, as TokenizedExample declares (read per micro-batch only)
        return TokenizedExample(int(self.source_index[i]), prompt, responses, pairs, scores, images,
                                mrope.reshape(3, -1).astype(np.int64) if mrope.size else None, int(self._delta[r]),
                                int(self.image_token_counts[i]))

    def digest(self) -> str:
        return self._digest

    def image_rows_changed(self) -> str | None:
        """The first image file referenced by path whose size or modification time changed."""
        paths, digests = self._images[0], self.ds.data.column("image_digest")
        for r in np.flatnonzero(self.image_counts > 0):
            row = int(self.kept[r])
            refs = paths[row].as_py()
            if any(p is None for p in refs):
                continue
            try:
                now = image_digest(refs)
            except OSError:
                return f"{refs} (missing)"
            if now != digests[row].as_py():
                return str(refs)
        return None


@dataclass
class Store:
    folder: Path
    meta: dict
    rows: StoreRows
    built: bool  # this start built it (False: read an existing one)
    seconds: float

    def reports(self, source: str) -> tuple[LoadReport, TokenizeReport]:
        t = self.rows.ds.data
        status = t.column("status").to_numpy()

        def messages(kinds) -> list[str]:  # in row order
            return t.column("message").take(np.flatnonzero(np.isin(status, kinds))).to_pylist()

        load_messages, token_messages = messages((INVALID_ROW, TIED_ROW)), messages((SPECIAL, IMAGE))
        invalid = int(np.isin(status, (INVALID_ROW, TIED_ROW)).sum())
        load = LoadReport(source, rows=len(status), kept=len(status) - invalid, skipped=invalid,
                          skip_messages=load_messages, tied_pairs=int(t.column("tied_pairs").to_numpy().sum()),
                          tied_rows=int((status == TIED_ROW).sum()),
                          capped_responses=int(t.column("capped").to_numpy().sum()))
        kept = status == KEPT
        tokens = TokenizeReport(examples=int(kept.sum()),
                                truncated_prompts=int((t.column("truncated_prompt").to_numpy() & kept).sum()),
                                truncated_responses=int(t.column("truncated_responses").to_numpy()[kept].sum()),
                                dropped_too_long=int((status == TOO_LONG).sum()),
                                special_token_rows=int((status == SPECIAL).sum()),
                                image_rows=int((status == IMAGE).sum()), skip_messages=token_messages)
        return load, tokens


def _open(folder: Path, key: str) -> Store | None:
    """The complete store in `folder`, or None (missing, or damaged: then said on stderr)."""
    import datasets

    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key:
            raise ValueError("its key differs from the folder's")
        for name, size in meta["files"].items():
            actual = (folder / name).stat().st_size
            if actual != size:
                raise ValueError(f"{name} has {actual} bytes, {size} recorded")
        with _quiet():
            parts = [datasets.Dataset.from_file(str(folder / name)) for name in sorted(meta["files"])]
        ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        if len(ds) != meta["rows"]:
            raise ValueError(f"{len(ds)} rows, {meta['rows']} recorded")
        rows = StoreRows(ds, meta["digest"])
    except Exception as err:  # noqa: BLE001 - any damage means: build it again
        print(f"pptrain: warning: the tokenized store {folder} is damaged ({type(err).__name__}: {err}); "
              "building it again", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    changed = rows.image_rows_changed()
    if changed is not None:
        print(f"pptrain: the images of the tokenized store {folder} changed ({changed}); building it again",
              file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return Store(folder, meta, rows, False, 0.0)


def open_store(d: DictConfig, path: str, tokenizer, vision: VisionText | None = None,
               local_main_first=None) -> Store:
    """The store of `path` under this tokenizer and these dataset settings: read when it exists,
    else built (by the local main process; the others wait in `local_main_first` and read it)."""
    check_tokenizer(tokenizer)
    began = time.perf_counter()
    key, parts = store_key(d, path, tokenizer, vision)
    name = Path(str(path)).stem if is_local_path(path) else str(path).replace("/", "--")
    folder = cache_root(d.get("cache_dir")) / f"{name[:60]}-{key[:20]}"
    built = False
    with (local_main_first() if local_main_first is not None else nullcontext()):
        store = _open(folder, key)
        if store is None:  # (another rank of this machine: only when the local main's build failed)
            _build(d, path, folder, key, parts, tokenizer, vision, d.get("num_proc") or usable_cores())
            built = True
            store = _open(folder, key)
            if store is None:
                raise DataError(f"the tokenized store {folder} could not be read back after it was built")
    store.built, store.seconds = built, time.perf_counter() - began
    what = (f"built in {store.seconds:.1f} s ({store.meta['processes']} process(es))" if built
            else f"read in {store.seconds:.2f} s")
    print(f"pptrain: tokenized store of {path}: {store.folder} ({store.meta['rows']} rows), {what}", file=sys.stderr)
    return store


def load_store_examples(d: DictConfig, path: str, tokenizer, vision: VisionText | None = None,
                        local_main_first=None) -> tuple[Examples, LoadReport, TokenizeReport, Store]:
    """The kept examples of `path` and the reports of its rows (the same errors as the
    in-process path when nothing is left)."""
    store = open_store(d, path, tokenizer, vision, local_main_first)
    load, tokens = store.reports(str(path))
    if not load.kept:
        first = f"; the first: {load.skip_messages[0]}" if load.skip_messages else ""
        raise DataError(f"{path}: no valid rows ({load.rows} rows, {load.skipped} invalid{first})"
                        f"{store.meta.get('format_hint', '')}")
    if not tokens.examples:
        raise no_examples_left(tokens)
    return Examples(store.rows), load, tokens, store
