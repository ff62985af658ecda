"""The demo's own benchmark for lm-evaluation-harness, built from held-out demo data, offline: which answer a story
supports (multiple choice by log-likelihood), which sentiment a sentence has, and the perplexity of held-out
stories (loglikelihood_rolling). The YAML files beside this one define the tasks; `make eval` passes this folder to
lm-eval as its include_path. Every item is drawn from the held-out side of the demo's prompt split, with its own
seed, so no stage trained on it."""
from __future__ import annotations

import random

from datasets import Dataset, DatasetDict

from pipeline import demo

SEED = 9001  # the benchmark's own draw of held-out prompts
ITEMS = 200  # per task


def _heldout(task: str) -> list[dict]:
    rows, seed = [], SEED
    while len(rows) < ITEMS:
        rows += [r for r in demo.generate_prompts(4 * ITEMS, seed, heldout=True) if r["task"] == task]
        seed += 1
    return rows[:ITEMS]


def _body(prompt: list[dict]) -> str:
    """The prompt's text after its instruction line."""
    return prompt[-1]["content"].split("\n\n", 1)[1]


def story_qa(**kwargs) -> DatasetDict:
    """A story and a question about one of its elements; the choices are the right answer and the same answer
    naming another element of that kind (three of them, or the other feeling)."""
    rng = random.Random(SEED)
    docs = []
    for row in _heldout("qa"):
        story, question = _body(row["prompt"]).rsplit("\n\nQuestion: ", 1)
        answer = row["reference"]
        kind, word = next((k, w) for k, words in demo.VOCAB.items() if k != "person"
                          for w in words if f" {w}." in answer)
        others = rng.sample([w for w in demo.VOCAB[kind] if w != word], min(3, len(demo.VOCAB[kind]) - 1))
        choices = [answer] + [answer.replace(f" {word}.", f" {w}.") for w in others]
        rng.shuffle(choices)
        docs.append({"story": story, "question": question, "choices": choices, "label": choices.index(answer)})
    return DatasetDict({"test": Dataset.from_list(docs)})


def sentiment(**kwargs) -> DatasetDict:
    docs = [{"sentence": _body(r["prompt"]), "label": ["positive", "negative"].index(
        r["reference"].rstrip(".").lower())} for r in _heldout("sentiment")]
    return DatasetDict({"test": Dataset.from_list(docs)})


def stories(**kwargs) -> DatasetDict:
    return DatasetDict({"test": Dataset.from_list([{"text": r["reference"]} for r in _heldout("story")])})
