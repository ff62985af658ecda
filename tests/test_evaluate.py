"""make eval / python -m pipeline.evaluate: lm-evaluation-harness on a registry checkpoint with the demo's own tasks,
offline, its results recorded on the entry; a hub task with no network, an unknown task, named."""
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.eval_tasks import demo_tasks
from pipeline.models import load_causal_lm
from pipeline.registry import Registry
from tests.conftest import PY, ROOT, copy_registry, env_for
from tests.wandb_records import runs_and_artifacts

pytest.importorskip("lm_eval", reason='the [eval] extra: pip install -e ".[eval]" (make test-all installs it)')


def evaluate(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "pipeline.evaluate", *args], cwd=ROOT, env=env_for(home), capture_output=True,
                          text=True, timeout=600)


@torch.no_grad()
def loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized as lm-eval tokenizes a pair: the whole, less the context's tokens."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n = len(tok(context, add_special_tokens=False)["input_ids"])
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(n, len(whole)))


@pytest.mark.slow
def test_the_demo_tasks_run_offline_and_the_entry_records_them(ci_pretrained, tmp_path):
    home = copy_registry(ci_pretrained, tmp_path)
    registry = Registry(str(home))
    entry = registry.resolve("pretrain:latest").entry
    r = evaluate(home, "--model", "pretrain:latest", "--tasks", "demo_sentiment,demo_stories", "--limit", "2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    after = registry.get(entry.id)
    assert after.metrics == entry.metrics and after.status == "complete"  # the training record untouched
    found = {(e["task"], e["metric"]): e for e in after.evaluations}
    acc = found[("demo_sentiment", "acc")]
    assert acc["limit"] == 2 and acc["num_fewshot"] == 0 and acc["stderr"] is not None and acc["lm_eval_version"]
    assert ("demo_stories", "word_perplexity") in found
    # the accuracy by hand: the choice of higher log-likelihood after the task's prompt, on the first two items
    model, tok = load_causal_lm(entry.path)
    model.eval()
    docs = demo_tasks.sentiment()["test"].select(range(2))
    right = 0
    for doc in docs:
        context = f"{doc['sentence']}\nIs this sentence positive or negative?\nAnswer:"
        scores = [loglikelihood(model, tok, context, f" {c}") for c in ("positive", "negative")]
        right += max(range(2), key=scores.__getitem__) == doc["label"]
    assert acc["value"] == pytest.approx(right / 2)
    assert list((Path(entry.path) / "evaluations").glob("lm_eval_*.json"))
    shown = subprocess.run([PY, "-m", "pipeline.registry", "show", "pretrain:latest", "--json"], cwd=ROOT,
                           env=env_for(home), capture_output=True, text=True, check=True)
    assert {e["task"] for e in json.loads(shown.stdout)["evaluations"]} == {"demo_sentiment", "demo_stories"}
    # run again: each result replaces its earlier self
    r = evaluate(home, "--model", "pretrain:latest", "--tasks", "demo_sentiment", "--limit", "2")
    assert r.returncode == 0 and len(registry.get(entry.id).evaluations) == len(after.evaluations)

    # a hub task with no network and no cache: exit 2, what to do, no traceback, the entry untouched
    r = evaluate(home, "--model", "pretrain:latest", "--tasks", "hellaswag", "--limit", "2")
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "hellaswag" in out and "HF_DATASETS_CACHE" in out and "Traceback" not in out, out
    assert len(registry.get(entry.id).evaluations) == len(after.evaluations)
    # an unknown task: the close matches lm-eval knows
    r = evaluate(home, "--model", "pretrain:latest", "--tasks", "demo_sentimnt")
    assert r.returncode == 2 and "unknown lm-eval task 'demo_sentimnt'; did you mean demo_sentiment" in r.stderr


@pytest.mark.slow
def test_a_pipeline_run_with_benchmarks_reports_what_each_stage_cost(tmp_path):
    """make all BENCHMARKS=...: every model of the run evaluated on the same tasks, each item's score kept, and
    the report's table of each stage's change against the pretrained model, item by item."""
    home = tmp_path / "runs"
    r = subprocess.run([PY, "-m", "pipeline.all", "--stages", "pretrain sft", "--benchmarks",
                        "demo_sentiment,demo_stories", "--", "experiment=ci", "logging=wandb", "eval.num_prompts=4"],
                       cwd=ROOT,
                       env={**env_for(home), "PIPELINE_ID": "pipeline-tax"}, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    registry = Registry(str(home))
    pretrain, sft = registry.pipeline_entries("pipeline-tax")
    scores = {}
    for e in (pretrain, sft):
        found = {(x["task"], x["metric"]): x for x in e.evaluations}
        assert e.status == "complete" and found[("demo_sentiment", "acc")]["stderr"] is not None
        for task, metric in (("demo_sentiment", "acc"), ("demo_stories", "bits_per_byte")):
            items = json.loads((Path(e.path) / found[(task, metric)]["items"]).read_text())[metric]
            assert len(items["values"]) == demo_tasks.ITEMS
            # the items' mean is lm-eval's own aggregate, so that item-by-item changes add up to its figures
            assert sum(items["values"]) / len(items["values"]) == pytest.approx(found[(task, metric)]["value"])
            scores[e.stage, metric] = items["values"]
        assert found[("demo_stories", "bits_per_byte")]["stderr"] > 0  # from the items: lm-eval gives none
    page = (home / "pipelines" / "pipeline-tax" / "report.md").read_text()
    assert "| task | metric | pretrain | sft | sft − pretrain |" in page
    assert (home / "pipelines" / "pipeline-tax" / "benchmarks.png").exists()
    for metric in ("acc", "bits_per_byte"):
        change = sum(scores["sft", metric]) / demo_tasks.ITEMS - sum(scores["pretrain", metric]) / demo_tasks.ITEMS
        row = next(line for line in page.splitlines() if line.startswith(f"| demo_s") and f"| {metric} |" in line)
        assert f"{change:+.4f} [" in row, row
    runs, _ = runs_and_artifacts(home / "wandb")
    evals = [x for x in runs if x.job_type == "eval"]
    assert len(evals) == 2 and {x.run_group for x in evals} == {"pipeline-tax"}


@pytest.mark.slow
def test_data_parallel_evaluation_shards_the_items_and_agrees_with_one_process(ci_pretrained, tmp_path):
    home = copy_registry(ci_pretrained, tmp_path)
    r = evaluate(home, "--model", "pretrain:latest", "--tasks", "demo_sentiment", "--limit", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    one = Registry(str(home)).resolve("pretrain:latest").entry.evaluations[0]
    r = subprocess.run([str(Path(PY).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                        "pipeline.evaluate", "--model", "pretrain:latest", "--tasks", "demo_sentiment", "--limit", "8"],
                       cwd=ROOT, env=env_for(home), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # 8 items of 2 choices: 16 requests, 8 in each process
    assert re.search(r"Running loglikelihood requests: 100%.*? 8/8 \[", r.stderr), r.stderr[-2000:]
    two = Registry(str(home)).resolve("pretrain:latest").entry.evaluations
    assert len(two) == 1 and two[0]["value"] == pytest.approx(one["value"]) and two[0]["created_at"] > one["created_at"]


def test_the_demo_tasks_are_held_out_and_well_formed():
    qa = demo_tasks.story_qa()["test"]
    assert len(qa) == demo_tasks.ITEMS
    for doc in qa.select(range(20)):
        right = doc["choices"][doc["label"]]
        assert len(set(doc["choices"])) == len(doc["choices"]) >= 2  # the right answer and others of its kind
        assert right.split()[-1].rstrip(".") in doc["story"]  # the one the story supports
    labels = demo_tasks.sentiment()["test"]["label"]
    assert set(labels) == {0, 1}
