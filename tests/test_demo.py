"""The demo task: deterministic generation and a gold judge that tells good responses from bad."""
import math
import statistics
from types import SimpleNamespace

import pytest
import torch

from pipeline import demo
from pipeline.evaluation import copy_rate, gold_gain, paired_bootstrap


def test_generators_are_deterministic_from_the_seed():
    assert demo.generate_corpus(50, 7) == demo.generate_corpus(50, 7)
    assert demo.generate_corpus(50, 7) != demo.generate_corpus(50, 8)
    assert demo.generate_demonstrations(40, 3) == demo.generate_demonstrations(40, 3)
    assert demo.generate_preferences(40, 3) == demo.generate_preferences(40, 3)
    assert demo.generate_prompts(40, 3, heldout=True) == demo.generate_prompts(40, 3, heldout=True)


def test_corpus_is_a_few_megabytes_of_stories():
    corpus = demo.generate_corpus(20000, 0)
    size = sum(map(len, corpus))
    assert 2e6 < size < 10e6
    assert all(s.endswith(".") for s in corpus[:100])


def test_heldout_prompts_never_appear_in_training_data():
    heldout = {r["prompt"][0]["content"] for r in demo.generate_prompts(300, 11, heldout=True)}
    train = {r["messages"][0]["content"] for r in demo.generate_demonstrations(2000, 11)}
    train |= {r["prompt"][0]["content"] for r in demo.generate_preferences(2000, 11)}
    train |= {r["prompt"][0]["content"] for r in demo.generate_prompts(2000, 11, heldout=False)}
    assert len(heldout) > 250 and not heldout & train


def test_demonstrations_cover_all_tasks_with_the_flawed_share():
    rows = demo.generate_demonstrations(2000, 1, flawed_share=0.3)
    assert {r["task"] for r in rows} == set(demo.TASKS)
    share = sum(r["flawed"] for r in rows) / len(rows)
    assert 0.25 < share < 0.35
    assert all(r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant" for r in rows)


def gold(row):
    return demo.gold_score(row["messages"][0]["content"], row["messages"][1]["content"])


@pytest.mark.parametrize("task", demo.TASKS)
def test_gold_judge_ranks_correct_above_flawed(task):
    rows = [r for r in demo.generate_demonstrations(2000, 5) if r["task"] == task]
    good = [gold(r) for r in rows if not r["flawed"]]
    bad = [gold(r) for r in rows if r["flawed"]]
    assert min(good) == 1.0
    assert max(bad) < 0.9 and statistics.mean(bad) < 0.8


def test_gold_judge_prefers_every_chosen_response():
    for r in demo.generate_preferences(500, 2):
        p = r["prompt"][0]["content"]
        assert demo.gold_score(p, r["chosen"][0]["content"]) > demo.gold_score(p, r["rejected"][0]["content"])


def test_gold_judge_scores_degenerate_responses_low():
    for r in demo.generate_prompts(40, 4, heldout=True):
        p = r["prompt"][0]["content"]
        assert demo.gold_score(p, "") == 0.0
        assert demo.gold_score(p, "the the the the the the the the the the") < 0.35
        looped = " ".join([r["reference"]] * 8)
        assert demo.gold_score(p, looped) < 0.8
        assert demo.gold_score(p, r["reference"]) == 1.0


def test_gold_judge_specifics():
    story = demo.render_story(demo.Story("Mia", "fox", "red", "kite", "park", "sad", 3))
    qa = f"Read the story and answer the question.\n\n{story}\n\nQuestion: What colour was the kite?"
    assert demo.gold_score(qa, "The kite was red.") == 1.0
    assert demo.gold_score(qa, "The kite was blue.") == pytest.approx(0.3)
    assert demo.gold_score(qa, "The kite was red or blue.") == pytest.approx(0.3)
    feel = qa.replace("What colour was the kite?", "How did Mia feel at the end?")
    assert demo.gold_score(feel, "Mia felt sad.") == 1.0 and demo.gold_score(feel, "Mia felt happy.") < 0.5
    senti = "Is this sentence positive or negative?\n\nMia loved the red kite."
    assert demo.gold_score(senti, "Positive.") == 1.0 and demo.gold_score(senti, "Negative.") < 0.5
    ask = "Write a short story about Mia, a fox and a red kite."
    assert demo.gold_score(ask, story) == 1.0
    assert demo.gold_score(ask, story.replace("red", "green")) < 0.8
    assert demo.gold_score(ask, story[:-1] + " and then") < demo.gold_score(ask, story)
    assert demo.gold_score("Tell me a joke.", "No.") == 0.0


@pytest.mark.parametrize("prompt", [
    "Write a short story about Tom and a red cat at the park.",
    "Read the story and answer the question.\n\nTom had a cat.\n\nQuestion: Who had a cat?",
    "Is this sentence positive or negative? Tom loved his cat.",
    "Summarize the story in one sentence.\n\nTom had a cat.",
])
def test_the_judge_scores_prompts_that_only_begin_like_the_demos(prompt):
    """A user's prompt that starts like a demo prompt gets a score, not an exception."""
    assert 0.0 <= demo.gold_score(prompt, "Tom had a red cat.") <= 0.3  # form only: there is nothing to check


class _Predictor(torch.nn.Module):
    """A causal LM stand-in that puts probability `repeat` on the true next token where that token is already in
    the text, and `first` where it is not."""

    def __init__(self, vocab: int, repeat: float, first: float):
        super().__init__()
        self.vocab, self.repeat, self.first = vocab, repeat, first
        self.config = SimpleNamespace(max_position_embeddings=512)
        self.device = torch.device("cpu")

    def forward(self, ids):
        ids = ids[0].tolist()
        logits = torch.full((1, len(ids), self.vocab), 0.0)
        for t, nxt in enumerate(ids[1:]):
            p = self.repeat if nxt in ids[:t + 1] else self.first
            logits[0, t] = math.log((1 - p) / (self.vocab - 1))
            logits[0, t, nxt] = math.log(p)
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("repeat, first, expect", [(0.9, 0.1, 1.0), (0.1, 0.9, 0.0)])
def test_copy_rate_counts_later_mentions_predicted_above_one_half(repeat, first, expect):
    from pipeline.tokenizer import train_bpe

    tok = train_bpe(demo.generate_corpus(2000, 1), 768, 128)  # names are tokens
    rates = copy_rate(_Predictor(len(tok), repeat, first), tok, demo.generate_corpus(20, 0))
    # the demo's stories name a colour and a place once; people, animals and objects come back
    assert rates == {"animal": expect, "obj": expect, "person": expect}


def test_paired_bootstrap_interval_matches_the_known_answer():
    # every prompt gains exactly 0.1: no spread, so the interval is the point
    assert paired_bootstrap([0.5] * 50, [0.6] * 50) == pytest.approx((0.1, 0.1, 0.1))
    # gains of +1 and -1 in equal numbers: mean 0, standard error 1/sqrt(n), so about +-1.96/sqrt(400)
    before = [0.0] * 400
    after = [1.0, -1.0] * 200
    gain, low, high = paired_bootstrap(before, after)
    assert gain == 0.0
    assert low == pytest.approx(-1.96 / 20, rel=0.1) and high == pytest.approx(1.96 / 20, rel=0.1)
    # pairing: scores that vary a lot between prompts but move together give a tight interval
    base = [i / 100 for i in range(100)]
    gain, low, high = paired_bootstrap(base, [b + 0.05 for b in base])
    assert (gain, low, high) == pytest.approx((0.05, 0.05, 0.05))
    with pytest.raises(ValueError, match="equal"):
        paired_bootstrap([1.0], [1.0, 2.0])


def test_gold_gain_names_its_interval():
    # gains 1, 0, 0, 1: a resample of 4 is all zeros (or all ones) with probability 1/16 > 2.5%, so the
    # interval runs from 0 to 1
    m = gold_gain([0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0])
    assert m == pytest.approx({"gold_gain": 0.5, "gold_gain_ci_low": 0.0, "gold_gain_ci_high": 1.0})
