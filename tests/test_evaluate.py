"""make eval / python -m pipeline.evaluate: lm-evaluation-harness on a registry checkpoint with the demo's own tasks,
offline, its results recorded on the entry; a hub task with no network, an unknown task, named."""
import json
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.eval_tasks import demo_tasks
from pipeline.models import load_causal_lm
from pipeline.registry import Registry
from tests.conftest import PY, ROOT, copy_registry, env_for

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


def test_the_demo_tasks_are_held_out_and_well_formed():
    qa = demo_tasks.story_qa()["test"]
    assert len(qa) == demo_tasks.ITEMS
    for doc in qa.select(range(20)):
        right = doc["choices"][doc["label"]]
        assert len(set(doc["choices"])) == len(doc["choices"]) >= 2  # the right answer and others of its kind
        assert right.split()[-1].rstrip(".") in doc["story"]  # the one the story supports
    labels = demo_tasks.sentiment()["test"]["label"]
    assert set(labels) == {0, 1}
