"""Data preparation at real size: `python scripts/data_store_bench.py [--rows N ...] [--out DIR]
[--num-proc-compare-rows R]` (defaults: 10000 100000 1000000 rows, outputs/data_store_bench, 20000).

For each N, a synthetic JSON Lines file of N rows (`<out>/rows-<N>.jsonl`, written one line at a
time): the 600 bundled HH-RLHF rows (ppo_train/assets/hh_rlhf/harmless_base_600.jsonl) in turn,
each with ` (case <i>)` appended to the text of the first Human turn of both "chosen" and
"rejected", so every prompt is distinct (no tokenization is shared between rows) and the
shared prompt still ends at the last "\\n\\nAssistant:" of the common prefix. Then three pptrain
processes, each started as `python -m ppo_train` with TOKENIZERS_PARALLELISM=false,
WANDB_MODE=disabled and HF_DATASETS_CACHE=<out>/hf-datasets-<N> (so the JSON-to-Arrow
conversion of `datasets` is neither read from nor left in the user's cache):

- first start: `loss=simpo trainer.max_steps=1 logging.progress=false dataset.path=<file>
  dataset.cache_dir=<out>/cache-<N> hydra.run.dir=<out>/run-<N>-first`, with the cache folders
  emptied first: it builds the tokenized store (dataset.num_proc: pptrain's default, the
  usable cores);
- second start: the same command with hydra.run.dir=<out>/run-<N>-second: it reads the store;
- stats: the same command with `mode=stats` and hydra.run.dir=<out>/run-<N>-stats (reads the
  store too); its stats.json gives the token count.

Per process: wall seconds (start to exit), data preparation seconds and stores built (training:
the first row of metrics.jsonl, `data/prepare_seconds` and `data/stores_built`; stats:
`data_report` in stats.json), and the peak resident memory: `/usr/bin/time -f %M`, i.e. the
largest maximum RSS of any one process of the tree (wait4's ru_maxrss; the workers of a
multi-process build are separate processes and are not summed). Without /usr/bin/time a small
Python wrapper reports its RUSAGE_CHILDREN ru_maxrss, which measures the same thing.

Tokens: stats.json `shared_tokens`, the prompt plus all responses of each example in the shared
layout, summed over the examples that stats keeps (those whose paired unit fits one ffd row;
`excluded_over_row_budget` counts the others), after truncation to the length limits.
Derived: bytes of peak RSS per token as the slope between consecutive sizes,
(RSS_b - RSS_a) / (tokens_b - tokens_a), for each of the three processes (the fixed cost of a
start, the model and libraries, cancels out); second-start preparation time as a fraction of
the first start's.

Scaling: a separate file of R rows (`rows-<R>-numproc.jsonl`), its store built by `mode=stats`
twice, with dataset.num_proc=1 and =2, each in empty cache folders; reported: both preparation
times, both build times (the store's meta.json `seconds`), the processes the build used (a store
is split only with >= 2000 rows per process) and the ratio num_proc=1 / num_proc=2.

The folders and files named above are deleted before they are written; a size whose process
fails is recorded with its error (the end of its stderr) and the others go on. Logs of every
process are in <out>/logs. Writes <out>/data_store_bench.json (all raw numbers), prints a
Markdown table on stdout and progress lines on stderr. Run from the repository root. The files
of 1000000 rows take about 1.4 GB (JSON Lines) plus its Arrow copy and the store.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "ppo_train" / "assets" / "hh_rlhf" / "harmless_base_600.jsonl"
TRAIN = ["loss=simpo", "trainer.max_steps=1", "logging.progress=false"]
MARKER = "\n\nAssistant:"
# fallback: run the command in a fresh Python process that reports its children's peak RSS (KiB on Linux)
WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
           "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(rc)")


def gnu_time() -> str | None:
    """/usr/bin/time when it is GNU time (it takes -f and -o), else None."""
    path = shutil.which("time", path="/usr/bin:/bin")
    if path is None:
        return None
    try:
        ok = subprocess.run([path, "-f", "%M", "-o", os.devnull, "true"], capture_output=True).returncode == 0
    except OSError:
        ok = False
    return path if ok else None


TIME = gnu_time()


def log(message: str) -> None:
    print(f"[data_store_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def clear(*paths: Path) -> None:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def with_case(row: dict, i: int) -> dict:
    """The row with ` (case i)` at the end of the first Human turn of both transcripts (the same
    place in both: inside their common prefix), or right after the first "Human: " when the
    first turn already differs."""
    chosen, rejected = row["chosen"], row["rejected"]
    mark = f" (case {i})"
    at = chosen.find(MARKER)
    if at < 0 or chosen[:at + len(MARKER)] != rejected[:at + len(MARKER)]:
        at = chosen.find("Human: ") + len("Human: ") if "Human: " in chosen else 0
        mark = f"(case {i}) "
        if chosen[:at] != rejected[:at]:
            at = 0
    return {**row, "chosen": chosen[:at] + mark + chosen[at:], "rejected": rejected[:at] + mark + rejected[at:]}


def write_rows(path: Path, n: int) -> dict:
    """N rows: the bundled rows in turn, each made unique (streamed: one line at a time)."""
    base = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    clear(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps(with_case(base[i % len(base)], i), ensure_ascii=False) + "\n")
    return {"path": str(path), "rows": n, "bytes": path.stat().st_size, "write_seconds": time.perf_counter() - began}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def store_meta(cache: Path) -> dict | None:
    """The store's meta.json (build processes and seconds) and its size on disk."""
    metas = sorted(cache.glob("*/meta.json"))
    if not metas:
        return None
    meta = json.loads(metas[0].read_text())
    return {"folder": str(metas[0].parent), "rows": meta.get("rows"), "processes": meta.get("processes"),
            "build_seconds": meta.get("seconds"), "bytes": folder_bytes(metas[0].parent), "stores": len(metas)}


def start(label: str, overrides: list[str], out: Path, hf_cache: Path) -> dict:
    """One pptrain process: wall seconds, peak RSS, return code and the end of stderr on failure."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rss_file = logs / f"{label}.maxrss_kib"
    clear(rss_file)
    command = [sys.executable, "-m", "ppo_train", *overrides]
    if TIME:
        wrapped = [TIME, "-f", "%M", "-o", str(rss_file), *command]
    else:
        wrapped = [sys.executable, "-c", WRAPPER, str(rss_file), *command]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "HF_DATASETS_CACHE": str(hf_cache)}
    log(f"{label}: {' '.join(overrides)}")
    load = os.getloadavg()[0]
    began = time.perf_counter()
    with (logs / f"{label}.stdout").open("w") as so, (logs / f"{label}.stderr").open("w") as se:
        rc = subprocess.call(wrapped, cwd=ROOT, env=env, stdout=so, stderr=se)
    wall = time.perf_counter() - began
    rec = {"label": label, "command": command, "returncode": rc, "wall_seconds": round(wall, 3),
           "loadavg_1min_before": load, "peak_rss_bytes": None, "error": None}
    try:
        rec["peak_rss_bytes"] = int(rss_file.read_text().strip().splitlines()[-1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if rc != 0:
        rec["error"] = (logs / f"{label}.stderr").read_text(errors="replace")[-2000:]
        log(f"{label}: failed (exit {rc}); see {logs / (label + '.stderr')}")
    else:
        log(f"{label}: {wall:.1f} s, peak RSS {mib(rec['peak_rss_bytes'])} MiB")
    return rec


def train_start(label: str, data: Path, cache: Path, out: Path, hf_cache: Path, extra=()) -> dict:
    run_dir = out / label
    clear(run_dir)
    rec = start(label, [*TRAIN, f"dataset.path={data}", f"dataset.cache_dir={cache}", f"hydra.run.dir={run_dir}",
                        *extra], out, hf_cache)
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        first = json.loads(metrics.read_text().splitlines()[0])
        rec["data"] = {k[len("data/"):]: v for k, v in first.items() if k.startswith("data/")}
    elif (run_dir / "data_report.json").is_file():
        rec["data"] = json.loads((run_dir / "data_report.json").read_text())
    else:
        rec["data"] = {}
        rec["error"] = rec["error"] or "no metrics.jsonl or data_report.json"
    rec["prepare_seconds"] = rec["data"].get("prepare_seconds")
    rec["stores_built"] = rec["data"].get("stores_built")
    return rec


STATS_KEYS = ("examples", "excluded_over_row_budget", "paired_tokens", "shared_tokens", "ideal_speedup")


def stats_start(label: str, data: Path, cache: Path, out: Path, hf_cache: Path, extra=()) -> dict:
    run_dir = out / label
    clear(run_dir)
    rec = start(label, [*TRAIN, "mode=stats", f"dataset.path={data}", f"dataset.cache_dir={cache}",
                        f"hydra.run.dir={run_dir}", *extra], out, hf_cache)
    path = run_dir / "stats.json"
    stats = json.loads(path.read_text()) if path.is_file() else {}
    if not stats:
        rec["error"] = rec["error"] or "no stats.json"
    rec["data"] = stats.get("data_report", {})
    rec["stats"] = {k: stats.get(k) for k in STATS_KEYS}
    rec["prepare_seconds"] = rec["data"].get("prepare_seconds")
    rec["stores_built"] = rec["data"].get("stores_built")
    return rec


def one_size(n: int, out: Path) -> dict:
    data, cache, hf = out / f"rows-{n}.jsonl", out / f"cache-{n}", out / f"hf-datasets-{n}"
    result = {"rows": n, "error": None}
    try:
        log(f"{n} rows: writing {data}")
        result["file"] = write_rows(data, n)
        clear(cache, hf)
        for which in ("first", "second"):
            result[which] = train_start(f"run-{n}-{which}", data, cache, out, hf)
        result["stats"] = stats_start(f"run-{n}-stats", data, cache, out, hf)
        result["store"] = store_meta(cache)
        result["hf_datasets_cache_bytes"] = folder_bytes(hf)
        result["tokens"] = result["stats"]["stats"].get("shared_tokens")
        first, second = result["first"], result["second"]
        if first.get("prepare_seconds") and second.get("prepare_seconds") is not None:
            result["second_over_first_prepare"] = second["prepare_seconds"] / first["prepare_seconds"]
        notes = []
        if first.get("stores_built") != 1:
            notes.append(f"first start: stores_built={first.get('stores_built')} (expected 1)")
        for k in ("second", "stats"):
            if result[k].get("stores_built") not in (0, None):
                notes.append(f"{k}: stores_built={result[k].get('stores_built')} (expected 0)")
        if first["data"].get("train_examples") != result["stats"]["stats"].get("examples"):
            notes.append(f"training kept {first['data'].get('train_examples')} examples, "
                         f"stats counted tokens over {result['stats']['stats'].get('examples')}")
        result["notes"] = notes
        errors = [f"{k}: {result[k]['error']}" for k in ("first", "second", "stats") if result[k].get("error")]
        result["error"] = "\n".join(errors) or None
    except Exception as err:  # record it and go on with the next size
        result["error"] = f"{type(err).__name__}: {err}"
        log(f"{n} rows: {result['error']}")
    return result


def num_proc_compare(rows: int, out: Path) -> dict:
    data = out / f"rows-{rows}-numproc.jsonl"
    result = {"rows": rows, "error": None}
    try:
        result["file"] = write_rows(data, rows)
        for procs in (1, 2):
            cache, hf = out / f"cache-{rows}-numproc{procs}", out / f"hf-datasets-{rows}-numproc{procs}"
            clear(cache, hf)
            rec = stats_start(f"run-{rows}-numproc{procs}", data, cache, out, hf, [f"dataset.num_proc={procs}"])
            rec["store"] = store_meta(cache)
            result[f"num_proc_{procs}"] = rec
        one, two = result["num_proc_1"], result["num_proc_2"]
        if one.get("prepare_seconds") and two.get("prepare_seconds"):
            result["prepare_ratio_1_over_2"] = one["prepare_seconds"] / two["prepare_seconds"]
        if one.get("store") and two.get("store") and two["store"]["build_seconds"]:
            result["build_ratio_1_over_2"] = one["store"]["build_seconds"] / two["store"]["build_seconds"]
        errors = [f"num_proc={p}: {result[f'num_proc_{p}']['error']}" for p in (1, 2) if result[f"num_proc_{p}"]["error"]]
        result["error"] = "\n".join(errors) or None
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}"
        log(f"num_proc comparison: {result['error']}")
    return result


def slopes(sizes: list[dict]) -> list[dict]:
    """Bytes of peak RSS per token between consecutive sizes that both have numbers."""
    good = [s for s in sizes if s.get("tokens")]
    out = []
    for a, b in zip(good, good[1:]):
        row = {"from_rows": a["rows"], "to_rows": b["rows"], "tokens_delta": b["tokens"] - a["tokens"]}
        for k in ("first", "second", "stats"):
            ra, rb = a[k].get("peak_rss_bytes"), b[k].get("peak_rss_bytes")
            row[f"{k}_bytes_per_token"] = (rb - ra) / row["tokens_delta"] if None not in (ra, rb) and row["tokens_delta"] else None
        out.append(row)
    return out


def error_line(text: str) -> str:
    """The line of an error text that says what went wrong (not Hydra's HYDRA_FULL_ERROR hint)."""
    lines = [ln.strip() for ln in text.strip().splitlines()
             if ln.strip() and not ln.startswith("Set the environment variable HYDRA_FULL_ERROR")]
    return (lines[-1] if lines else text.strip())[:300]


def mib(v) -> str:
    return "-" if v is None else f"{v / 2**20:.0f}"


def num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(result: dict) -> str:
    by_to = {s["to_rows"]: s for s in result["slopes"]}
    lines = ["| rows | tokens | first prep s | second prep s | second/first | first wall s | second wall s "
             "| first RSS MiB | second RSS MiB | stats RSS MiB | B/token first | B/token second | B/token stats |",
             "|" + "---|" * 13]
    for s in result["sizes"]:
        f, c, st = s.get("first", {}), s.get("second", {}), s.get("stats", {})
        sl = by_to.get(s["rows"], {})
        lines.append(f"| {s['rows']} | {num(s.get('tokens'), 'd')} | {num(f.get('prepare_seconds'), '.2f')} "
                     f"| {num(c.get('prepare_seconds'), '.2f')} | {num(s.get('second_over_first_prepare'), '.3f')} "
                     f"| {num(f.get('wall_seconds'), '.1f')} | {num(c.get('wall_seconds'), '.1f')} "
                     f"| {mib(f.get('peak_rss_bytes'))} | {mib(c.get('peak_rss_bytes'))} | {mib(st.get('peak_rss_bytes'))} "
                     f"| {num(sl.get('first_bytes_per_token'), '.1f')} | {num(sl.get('second_bytes_per_token'), '.1f')} "
                     f"| {num(sl.get('stats_bytes_per_token'), '.1f')} |")
    for s in result["sizes"]:
        if s.get("error"):
            lines.append(f"error ({s['rows']} rows): {error_line(s['error'])}")
        for note in s.get("notes", []):
            lines.append(f"note ({s['rows']} rows): {note}")
    cmp = result.get("num_proc_compare")
    if cmp:
        one, two = cmp.get("num_proc_1", {}), cmp.get("num_proc_2", {})
        store1, store2 = one.get("store") or {}, two.get("store") or {}
        lines += ["", f"scaling ({cmp['rows']} rows, mode=stats): data preparation "
                  f"{num(one.get('prepare_seconds'), '.2f')} s with num_proc=1 ({store1.get('processes', '-')} process), "
                  f"{num(two.get('prepare_seconds'), '.2f')} s with num_proc=2 ({store2.get('processes', '-')} processes): "
                  f"ratio {num(cmp.get('prepare_ratio_1_over_2'), '.2f')}; store build "
                  f"{num(store1.get('build_seconds'), '.2f')} s / {num(store2.get('build_seconds'), '.2f')} s: "
                  f"ratio {num(cmp.get('build_ratio_1_over_2'), '.2f')}"]
        if cmp.get("error"):
            lines.append(f"scaling error: {error_line(cmp['error'])}")
    return "\n".join(lines)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10000, 100000, 1000000])
    parser.add_argument("--out", default="outputs/data_store_bench")
    parser.add_argument("--num-proc-compare-rows", type=int, default=20000, help="0: no num_proc comparison")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # this script's own files from an earlier invocation (other sizes): nothing stale is reported
    clear(*[p for pattern in ("rows-*.jsonl", "cache-*", "hf-datasets-*", "run-*", "logs", "data_store_bench.json")
            for p in out.glob(pattern)])
    result = {"args": vars(args), "python": sys.executable, "cpu_count": os.cpu_count(),
              "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
              "rss_method": f"{TIME} -f %M" if TIME else "python wrapper: RUSAGE_CHILDREN ru_maxrss",
              "env": {"TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
                      "HF_DATASETS_CACHE": "<out>/hf-datasets-<label>"},
              "sizes": [], "slopes": [], "num_proc_compare": None}
    began = time.perf_counter()

    def save() -> None:
        result["slopes"] = slopes(result["sizes"])
        result["wall_seconds"] = time.perf_counter() - began
        (out / "data_store_bench.json").write_text(json.dumps(result, indent=2) + "\n")

    for n in args.rows:
        result["sizes"].append(one_size(n, out))
        save()  # a partial result survives an interrupted or failing later size
    if args.num_proc_compare_rows > 0:
        log(f"num_proc comparison: {args.num_proc_compare_rows} rows")
        result["num_proc_compare"] = num_proc_compare(args.num_proc_compare_rows, out)
    save()
    print(table(result))
    log(f"wrote {out / 'data_store_bench.json'}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
