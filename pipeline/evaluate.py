"""Standard benchmarks on any checkpoint, through lm-evaluation-harness (lm-eval 0.4), recorded on its entry.

    make eval MODEL=ppo:latest                                  # the demo's own benchmark, offline
    make eval MODEL=sft:latest TASKS=hellaswag,arc_easy         # lm-eval's tasks (their data from the hub)
    python -m pipeline.evaluate --model REF --tasks t1,t2 [--limit N] [--num-fewshot K] [--chat-template]

REF is a registry reference (ppo:latest, an entry id), a directory or a hub id; the model and tokenizer are loaded
by the pipeline's one loader. With no --tasks it runs the demo's tasks (pipeline/eval_tasks/, tag `demo`): which
answer a story supports, which sentiment a sentence has, the perplexity of held-out stories. Each result (task,
metric, value, stderr, few-shot count, limit, lm-eval's and the task's version) is added to the entry, replacing
an earlier one of the same task, metric, few-shot count and limit (`python -m pipeline.registry show REF`), and
lm-eval's results JSON is kept beside the checkpoint (evaluations/), with each item's score, so that two
checkpoints can be compared item by item. An evaluation never changes the entry's status or its training metrics;
an entry that logs to wandb gets a run of job type `eval` in its pipeline's group.

    python -m pipeline.evaluate --pipeline PIPELINE_ID [--tasks ...]      # every model of a pipeline run
    accelerate launch --num_processes N -m pipeline.evaluate --model REF   # data parallel: each process a shard

--pipeline evaluates the pretrained, SFT and alignment entries of one `make all` run on the same tasks (make all
BENCHMARKS=demo does it before the report): the report's benchmark table, the alignment tax. Install the extra
first: pip install -e ".[eval]" (make eval does).
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import statistics
import sys
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.registry import Entry, Registry, now

TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
DEMO_TASKS = ["demo"]  # the tag of the shipped tasks
# The metrics compared item by item between checkpoints: those lm-eval aggregates as the mean of one number per
# item, and bits_per_byte (the items' bits over their bytes), which is the mean of each item's bits over the mean
# bytes per item, the same for every model scored on the same items.
PAIRED_METRICS = ("acc", "acc_norm", "exact_match", "bits_per_byte")
# What lm-eval raises when a task's data is on the hub and the hub cannot be reached (names, to import nothing).
OFFLINE_ERRORS = ("ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "DatasetNotFoundError",
                  "HfHubHTTPError", "ConnectError", "MaxRetryError")


def task_manager():
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise PipelineError('lm-evaluation-harness is not installed: pip install -e ".[eval]" '
                            '(make eval installs it)') from None
    return TaskManager(include_path=str(TASKS_DIR))


def check_tasks(manager, tasks: list[str]) -> None:
    """Name every task lm-eval does not know, with the close matches it does."""
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=5, cutoff=0.6)
            raise PipelineError(f"unknown lm-eval task '{task}'" + (f"; did you mean {', '.join(close)}?" if close
                                else "; `lm-eval ls tasks` lists them, `demo` runs the demo's own"))


def item_scores(results: dict) -> dict[str, dict[str, dict]]:
    """{task: {metric: {"doc_ids": [...], "values": [...]}}} from lm-eval's logged samples, for PAIRED_METRICS:
    one number per item whose mean is lm-eval's aggregate."""
    out = {}
    for task, samples in (results.get("samples") or {}).items():
        per_metric: dict[str, list] = {}
        for s in sorted(samples, key=lambda s: s["doc_id"]):
            for name in s.get("metrics", []):
                if name in PAIRED_METRICS and name in s:
                    key = name if s.get("filter", "none") == "none" else f"{name},{s['filter']}"
                    per_metric.setdefault(key, []).append((s["doc_id"], s[name]))
        for key, rows in per_metric.items():
            values = [v for _, v in rows]
            if key.partition(",")[0] == "bits_per_byte":  # (log-likelihood, bytes) per item
                mean_bytes = sum(n for _, n in values) / len(values)
                values = [-ll / math.log(2) / mean_bytes for ll, _ in values]
            out.setdefault(task, {})[key] = {"doc_ids": [d for d, _ in rows], "values": [float(v) for v in values]}
    return out


def records(results: dict, limit: int | None, version: str, items: dict | None = None) -> list[dict]:
    """One record per task and metric of lm-eval's results: its value and stderr. Where lm-eval gives no stderr
    (bits_per_byte) it is the items' standard error; otherwise None."""
    out, created, items = [], now(), items or {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            metric = name if filt == "none" else f"{name},{filt}"
            stderr = metrics.get(f"{name}_stderr,{filt}")
            per_item = items.get(task, {}).get(metric)
            if not isinstance(stderr, (int, float)) and per_item and len(per_item["values"]) > 1:
                stderr = statistics.stdev(per_item["values"]) / math.sqrt(len(per_item["values"]))
            out.append({"task": task, "metric": metric, "value": float(value),
                        "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                        "num_fewshot": results.get("n-shot", {}).get(task), "limit": limit,
                        "lm_eval_version": version, "task_version": results.get("versions", {}).get(task),
                        "created_at": created})
    return out


def items_file(record: dict) -> str:
    """Where, in the entry's folder, the item scores of a record's task, few-shot count and limit are kept."""
    limit = "all" if record["limit"] is None else record["limit"]
    return f"evaluations/items_{record['task']}_{record['num_fewshot']}shot_{limit}.json"


def distribute(lm) -> None:
    """Under `accelerate launch` with several processes, make lm-eval shard the requests over them: its own
    data-parallel path loads the model itself, so a model loaded by the pipeline is handed the same state."""
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # on CPU, processes join only when told so
    if accelerator.num_processes > 1:
        lm._model.to(accelerator.device)
        lm.accelerator, lm._device = accelerator, accelerator.device
        lm._rank, lm._world_size = accelerator.process_index, accelerator.num_processes


def evaluate(ref: str, tasks: list[str], limit: int | None = None, num_fewshot: int | None = None,
             batch_size: int = 16, chat_template: bool = False, registry: Registry | None = None) -> list[dict]:
    """Run the tasks on the checkpoint REF; record the results on its entry (if it has one); return them (in every
    process but the first of a data-parallel run: nothing)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from pipeline.models import load_causal_lm

    registry = registry or Registry()
    manager = task_manager()
    check_tasks(manager, tasks)
    resolved = registry.resolve(ref)
    model, tok = load_causal_lm(resolved.path)
    try:
        lm = HFLM(pretrained=model.eval(), tokenizer=tok, batch_size=batch_size,
                  max_length=getattr(model.config, "max_position_embeddings", None))
    except Exception as e:
        raise PipelineError(f"lm-eval cannot load the model '{ref}' ({resolved.path}): {e}") from None
    distribute(lm)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, apply_chat_template=chat_template,
                                          bootstrap_iters=1000, log_samples=True)
    except Exception as e:
        chain = [e] + ([e.__cause__] if e.__cause__ else []) + ([e.__context__] if e.__context__ else [])
        if any(type(x).__name__ in OFFLINE_ERRORS or "offline" in str(x).lower() for x in chain):
            raise PipelineError(
                f"the data of task(s) {', '.join(tasks)} is on the Hugging Face hub, which cannot be reached, and is "
                f"not in the cache: run once with a network to cache it, or point HF_DATASETS_CACHE at a copy "
                f"({type(e).__name__})") from None
        raise
    if results is None:  # a data-parallel run's other processes: the first one records
        return []
    version = getattr(lm_eval, "__version__", "unknown")
    items = item_scores(results)
    found = records(results, limit, version, items)
    if resolved.entry is not None:
        record(registry, resolved.entry, results, found, items)
    return found


def record(registry: Registry, entry: Entry, results: dict, found: list[dict], items: dict) -> None:
    """lm-eval's results JSON and the item scores beside the checkpoint, the results on the entry, and the entry's
    wandb run of job type `eval`."""
    from pipeline import tracking

    folder = Path(entry.path) / "evaluations"
    folder.mkdir(exist_ok=True)
    stamp = found[0]["created_at"].replace(":", "").replace("+", "_") if found else now()
    kept = {k: v for k, v in results.items() if k != "samples"}  # each item's prompt and answers: the bulk
    (folder / f"lm_eval_{stamp}.json").write_text(json.dumps(kept, indent=2, default=str))
    for r in found:
        if r["metric"] in items.get(r["task"], {}):
            r["items"] = items_file(r)
    for r in {r["items"]: r for r in found if "items" in r}.values():  # one file per task
        (Path(entry.path) / r["items"]).write_text(json.dumps(items[r["task"]]))
    registry.record_evaluations(entry.id, found)
    tracking.log_evaluation(entry, found, registry.root)


def evaluate_pipeline(pipeline_id: str, tasks: list[str], registry: Registry | None = None, **kwargs) -> list[Entry]:
    """Evaluate each model of a pipeline run (its pretrained, SFT and alignment entries: not the reward model) on
    the same tasks; return the entries evaluated."""
    registry = registry or Registry()
    entries = [e for e in registry.pipeline_entries(pipeline_id) if e.status == "complete" and e.stage != "reward"]
    if not entries:
        raise PipelineError(f"pipeline run '{pipeline_id}' has no complete model to evaluate")
    for e in entries:
        print(f"Evaluating {e.stage} {e.id} on {', '.join(tasks)}", flush=True)
        evaluate(e.id, tasks, registry=registry, **kwargs)
    return entries


def paired_change(before: Entry, after: Entry, r: dict) -> tuple[float, float, float] | None:
    """after - before on the record R's task and metric, item by item over the items both scored, with its paired
    bootstrap 95% interval; None where either lacks the item scores."""
    from pipeline.evaluation import paired_bootstrap

    def scores(e: Entry) -> dict | None:  # the file's name holds the task, few-shot count and limit
        path = Path(e.path) / items_file(r)
        return json.loads(path.read_text()).get(r["metric"]) if path.exists() else None

    a, b = scores(before), scores(after)
    if not a or not b:
        return None
    by_doc = dict(zip(b["doc_ids"], b["values"]))
    pairs = [(v, by_doc[d]) for d, v in zip(a["doc_ids"], a["values"]) if d in by_doc]
    if not pairs:
        return None
    return paired_bootstrap([p[0] for p in pairs], [p[1] for p in pairs])


def benchmark_rows(entries: list[Entry]) -> tuple[list[Entry], list[tuple]]:
    """The evaluated entries (the first one the baseline), and per task and metric the first's settings (few-shot
    count, limit), which every column is read at."""
    evaluated = [e for e in entries if e.evaluations]
    if not evaluated:
        return [], []
    keys = [(r["task"], r["metric"], r["num_fewshot"], r["limit"]) for r in evaluated[0].evaluations]
    return evaluated, sorted(dict.fromkeys(keys), key=lambda k: (k[0], k[1]))


def find(e: Entry, key: tuple) -> dict | None:
    return next((r for r in e.evaluations if (r["task"], r["metric"], r["num_fewshot"], r["limit"]) == key), None)


def benchmark_table(entries: list[Entry]) -> str | None:
    """Markdown: each task and metric (rows) for each evaluated stage (value ± stderr), and each later stage's
    change against the first (pretraining, in a pipeline run) with its paired bootstrap interval."""
    evaluated, keys = benchmark_rows(entries)
    if not keys:
        return None
    base, later = evaluated[0], evaluated[1:]
    head = ["task", "metric"] + [e.stage for e in evaluated] + [f"{e.stage} − {base.stage}" for e in later]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        row = [key[0], key[1]]
        for e in evaluated:
            r = find(e, key)
            row.append("–" if r is None else f"{r['value']:.4f}" + ("" if r["stderr"] is None else f" ± {r['stderr']:.4f}"))
        for e in later:
            change = paired_change(base, e, find(base, key)) if find(e, key) else None
            row.append("–" if change is None else f"{change[0]:+.4f} [{change[1]:+.4f}, {change[2]:+.4f}]")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_benchmarks(entries: list[Entry], out: Path) -> Path | None:
    """One panel per task and item-compared metric: each evaluated stage's value with its stderr."""
    import matplotlib.pyplot as plt

    evaluated, keys = benchmark_rows(entries)
    keys = [k for k in keys if k[1].partition(",")[0] in PAIRED_METRICS]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys) + 1, 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        found = [(e.stage, r) for e in evaluated if (r := find(e, key)) is not None]
        ax.bar([s for s, _ in found], [r["value"] for _, r in found], yerr=[r["stderr"] or 0 for _, r in found],
               capsize=4, color="tab:blue", alpha=0.8)
        ax.set(title=f"{key[0]}\n{key[1]}", ylabel=key[1])
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = out / "benchmarks.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def table(found: list[dict]) -> str:
    lines = ["| task | metric | value | stderr | few-shot | limit |", "|---|---|---|---|---|---|"]
    for r in found:
        stderr = "–" if r["stderr"] is None else f"{r['stderr']:.4f}"
        lines.append(f"| {r['task']} | {r['metric']} | {r['value']:.4f} | {stderr} | {r['num_fewshot']} | "
                     f"{r['limit'] if r['limit'] is not None else '–'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n\n")[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a registry reference (ppo:latest, an entry id), directory or hub id")
    which.add_argument("--pipeline", metavar="PIPELINE_ID",
                       help="every model of this pipeline run (pretrain, SFT and each alignment stage)")
    ap.add_argument("--tasks", default=",".join(DEMO_TASKS),
                    help="comma-separated lm-eval tasks or groups (default: demo, the demo's own, offline)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many items per task")
    ap.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--chat-template", action="store_true",
                    help="wrap each item in the tokenizer's chat template (for tasks written for chat models)")
    args = ap.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    settings = dict(limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                    chat_template=args.chat_template)
    try:
        if args.pipeline:
            print(benchmark_table(evaluate_pipeline(args.pipeline, tasks, **settings)) or "")
        else:
            found = evaluate(args.model, tasks, **settings)
            if found:
                print(table(found))
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
