"""Standard benchmarks on any checkpoint, through lm-evaluation-harness (lm-eval 0.4), recorded on its entry.

    make eval MODEL=ppo:latest                                  # the demo's own benchmark, offline
    make eval MODEL=sft:latest TASKS=hellaswag,arc_easy         # lm-eval's tasks (their data from the hub)
    python -m pipeline.evaluate --model REF --tasks t1,t2 [--limit N] [--num-fewshot K] [--chat-template]

REF is a registry reference (ppo:latest, an entry id), a directory or a hub id; the model and tokenizer are loaded
by the pipeline's one loader. With no --tasks it runs the demo's tasks (pipeline/eval_tasks/, tag `demo`): which
answer a story supports, which sentiment a sentence has, the perplexity of held-out stories. Each result (task,
metric, value, stderr, few-shot count, limit, lm-eval's and the task's version) is added to the entry, replacing
an earlier one of the same task, metric, few-shot count and limit (`python -m pipeline.registry show REF`), and
lm-eval's results JSON is kept beside the checkpoint (evaluations/). An evaluation never changes the entry's
status or its training metrics. Install the extra first: pip install -e ".[eval]" (make eval does).
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.registry import Registry, now

TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
DEMO_TASKS = ["demo"]  # the tag of the shipped tasks
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


def records(results: dict, limit: int | None, version: str) -> list[dict]:
    """One record per task and metric of lm-eval's results: its value and stderr (None where lm-eval gives none)."""
    out, created = [], now()
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{name}_stderr,{filt}")
            out.append({"task": task, "metric": name if filt == "none" else f"{name},{filt}", "value": float(value),
                        "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                        "num_fewshot": results.get("n-shot", {}).get(task), "limit": limit,
                        "lm_eval_version": version, "task_version": results.get("versions", {}).get(task),
                        "created_at": created})
    return out


def evaluate(ref: str, tasks: list[str], limit: int | None = None, num_fewshot: int | None = None,
             batch_size: int = 16, chat_template: bool = False, registry: Registry | None = None) -> list[dict]:
    """Run the tasks on the checkpoint REF; record the results on its entry (if it has one); return them."""
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
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, apply_chat_template=chat_template,
                                          bootstrap_iters=1000, log_samples=False)
    except Exception as e:
        chain = [e] + ([e.__cause__] if e.__cause__ else []) + ([e.__context__] if e.__context__ else [])
        if any(type(x).__name__ in OFFLINE_ERRORS or "offline" in str(x).lower() for x in chain):
            raise PipelineError(
                f"the data of task(s) {', '.join(tasks)} is on the Hugging Face hub, which cannot be reached, and is "
                f"not in the cache: run once with a network to cache it, or point HF_DATASETS_CACHE at a copy "
                f"({type(e).__name__})") from None
        raise
    version = getattr(lm_eval, "__version__", "unknown")
    found = records(results, limit, version)
    if resolved.entry is not None:
        folder = Path(resolved.entry.path) / "evaluations"
        folder.mkdir(exist_ok=True)
        stamp = found[0]["created_at"].replace(":", "").replace("+", "_") if found else now()
        (folder / f"lm_eval_{stamp}.json").write_text(json.dumps(results, indent=2, default=str))
        registry.record_evaluations(resolved.entry.id, found)
    return found


def table(found: list[dict]) -> str:
    lines = ["| task | metric | value | stderr | few-shot | limit |", "|---|---|---|---|---|---|"]
    for r in found:
        stderr = "–" if r["stderr"] is None else f"{r['stderr']:.4f}"
        lines.append(f"| {r['task']} | {r['metric']} | {r['value']:.4f} | {stderr} | {r['num_fewshot']} | "
                     f"{r['limit'] if r['limit'] is not None else '–'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a registry reference (ppo:latest, an entry id), directory or hub id")
    ap.add_argument("--tasks", default=",".join(DEMO_TASKS),
                    help="comma-separated lm-eval tasks or groups (default: demo, the demo's own, offline)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many items per task")
    ap.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--chat-template", action="store_true",
                    help="wrap each item in the tokenizer's chat template (for tasks written for chat models)")
    args = ap.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        found = evaluate(args.model, tasks, args.limit, args.num_fewshot, args.batch_size, args.chat_template)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
