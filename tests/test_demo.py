"""The demo task: deterministic generation and a gold judge that tells good responses from bad."""
import math
import re
import statistics
from types import SimpleNamespace

import pytest
import torch

from pipeline import demo
from pipeline.evaluation import copy_rate, gain, paired_bootstrap


def test_generators_are_deterministic_from_the_seed():
    assert demo.generate_corpus(50, 7) == demo.generate_corpus(50, 7)
    assert demo.generate_corpus(50, 7) != demo.generate_corpus(50, 8)
    assert demo.generate_demonstrations(40, 3) == demo.generate_demonstrations(40, 3)
    assert demo.generate_preferences(40, 3) == demo.generate_preferences(40, 3)
    assert demo.generate_prompts(40, 3, heldout=True) == demo.generate_prompts(40, 3, heldout=True)


def test_corpus_is_a_few_megabytes_of_stories():
    corpus = demo.generate_corpus(20000, 0)
    size = sum(map(len, corpus))
    assert 2e6 < size < 12e6
    assert all(s.endswith((".", '."')) for s in corpus[:100])


def test_corpus_quotes_lines_of_its_own_story_word_for_word():
    corpus = demo.generate_corpus(300, 3)
    quotes = [(d, q) for d in corpus for q in re.findall(r'"([^"]+)"', d)]
    assert len(quotes) > 100
    for doc, quote in quotes:
        story = doc.split("\n\n")[1 if doc.split("\n\n")[0].endswith(("question.", "story.")) else 0]
        assert quote in story and any(re.search(rf"\b{w}\b", quote) for w in demo.COLOURS + demo.OBJECTS
                                      + demo.PLACES + demo.ANIMALS), (quote, story)


def test_corpus_speaks_the_instruction_language_and_mentions_every_element_again():
    """Half the documents or more carry a reader's question and answer, a summary or a sentiment statement, and a
    colour, an object and a place recur in a document as names do: pretraining has them copied."""
    corpus = demo.generate_corpus(2000, 0)
    readers = [d for d in corpus if "Question:" in d or "sentence" in d or "Summary" in d or "Summarize" in d]
    assert len(readers) / len(corpus) > 0.5
    for words in (demo.COLOURS, demo.OBJECTS, demo.PLACES):
        again = sum(any(len(re.findall(rf"\b{w}\b", d)) > 1 for w in words) for d in corpus)
        assert again / len(corpus) > 0.3, words


def test_heldout_prompts_never_appear_in_training_data():
    heldout = {r["prompt"][0]["content"] for r in demo.generate_prompts(300, 11, heldout=True)}
    train = {r["messages"][0]["content"] for r in demo.generate_demonstrations(2000, 11)}
    train |= {r["prompt"][0]["content"] for r in demo.generate_preferences(2000, 11)}
    train |= {r["prompt"][0]["content"] for r in demo.generate_prompts(2000, 11, heldout=False)}
    assert len(heldout) > 250 and not heldout & train


def test_demonstrations_cover_all_tasks_with_the_flawed_share():
    rows = demo.generate_demonstrations(2000, 1, flawed_share=0.3)
    assert {r["task"] for r in rows} == set(demo.TASKS)
    share = sum(r["flaw"] is not None for r in rows) / len(rows)
    assert 0.25 < share < 0.35
    assert {r["flaw"] for r in rows} == set(demo.FLAWS) | {None}
    assert all(r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant" for r in rows)


def test_flawed_demonstrations_bound_what_imitating_them_scores():
    """Sampled exactly as they are, the default demonstrations (30% flawed) score under 0.80 with the gold
    judge: the most an SFT model sampled at temperature 1 can expect."""
    own = lambda share: [demo.gold_score(r["messages"][0]["content"], r["messages"][1]["content"])
                         for r in demo.generate_demonstrations(2000, 4, flawed_share=share)]
    assert sum(own(0.0)) / 2000 == 1.0
    assert 0.75 < sum(own(0.3)) / 2000 < 0.80


def test_flaw_shares_choose_the_classes_and_swaps_stay_a_small_share():
    pairs = demo.generate_preferences(3000, 2)
    swaps = sum(r["flaw"] == "swap" for r in pairs) / len(pairs)
    assert 0.10 <= swaps <= 0.15
    only = demo.generate_preferences(200, 2, flaw_shares={"unhelpful": 1.0})
    assert {r["flaw"] for r in only} == {"unhelpful"}
    no_swap = demo.generate_demonstrations(400, 2, flawed_share=1.0, flaw_shares={**demo.FLAW_SHARES, "swap": 0.0})
    assert "swap" not in {r["flaw"] for r in no_swap}


def swapped_element(row) -> str:
    """The element a swap pair's rejected response replaced: the vocabulary of the word the chosen one has alone."""
    words = lambda side: set(re.findall(r"\w+", row[side][0]["content"]))
    (word,) = words("chosen") - words("rejected") - {"a", "an"}  # the article follows the new word
    return next(k for k, vocab in demo.VOCAB.items() if word in vocab)


@pytest.mark.parametrize("elements", [["person"], ["place", "obj", "ending"]])
def test_swaps_replace_only_the_elements_named(elements):
    pairs = demo.generate_preferences(1500, 4, flaw_shares={**demo.FLAW_SHARES, "swap": 1.5}, swap_elements=elements)
    swaps = [r for r in pairs if r["flaw"] == "swap"]
    assert len(swaps) > 300 and {swapped_element(r) for r in swaps} == set(elements)
    # a task whose responses name none of the elements gets its other flaw classes
    qa = [r for r in pairs if r["task"] == "qa"]
    assert qa and ("swap" in {r["flaw"] for r in qa}) == ("person" not in elements)
    everything = demo.generate_preferences(1500, 4, flaw_shares={"swap": 1.0})
    assert {swapped_element(r) for r in everything} == set(demo.VOCAB)


def gold(row):
    return demo.gold_score(row["messages"][0]["content"], row["messages"][1]["content"])


@pytest.mark.parametrize("task", demo.TASKS)
def test_gold_judge_ranks_correct_above_flawed(task):
    rows = [r for r in demo.generate_demonstrations(2000, 5) if r["task"] == task]
    good = [gold(r) for r in rows if not r["flaw"]]
    bad = [gold(r) for r in rows if r["flaw"]]
    assert min(good) == 1.0
    assert max(bad) <= 0.5 and statistics.mean(bad) < 0.5


@pytest.mark.parametrize("flaw", demo.FLAWS)
def test_every_flaw_class_is_generated_found_by_its_detector_and_costs_gold(flaw):
    rows = demo.generate_preferences(800, 3, flaw_shares={flaw: 1.0})
    assert len(rows) > 100 and {r["flaw"] for r in rows} == {flaw}
    for r in rows:
        prompt, good, bad = r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert demo.detect_flaws(prompt, good) == set(), (prompt, good)
        assert flaw in demo.detect_flaws(prompt, bad), (prompt, bad)
        assert demo.gold_score(prompt, bad) <= demo.gold_score(prompt, good) - 0.5, (prompt, bad)


def test_detectors_find_a_models_own_flaws():
    story = demo.render_story(demo.Story("Ella", "rabbit", "white", "box", "park", "happy", 5))
    ask = "Write a short story about Ella, a rabbit and a white box."
    assert demo.detect_flaws(ask, story) == set()
    assert demo.detect_flaws(ask, story.replace("white box", "yellow kite")) == {"swap"}
    qa = f"Read the story and answer the question.\n\n{story}\n\nQuestion: What colour was the box?"
    assert demo.detect_flaws(qa, "The box was white.") == set()
    assert demo.detect_flaws(qa, "The ball was white.") == {"swap"}  # the wrong object
    assert demo.detect_flaws(qa, "The box was white. The box was white") == {"repetition", "no_stop"}
    assert demo.detect_flaws(qa, "I don't know.") == {"unhelpful"}
    assert demo.detect_flaws(qa, "The box was white. You will like it.") == {"verbosity"}
    senti = "Is this sentence positive or negative?\n\nElla loved the white box."
    assert demo.detect_flaws(senti, "Positive, because she loved it.") == {"format"}
    assert demo.detect_flaws(senti, "Negative.") == {"wrong_label"}
    summary = f"Summarize the story in one sentence.\n\n{story}"
    assert demo.detect_flaws(summary, "Ella went to the park. She met a rabbit.") == {"format"}


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
    assert demo.gold_score(qa, "The kite was blue.") == 0.0
    assert demo.gold_score(qa, "The kite was red or blue.") == 0.0
    assert demo.gold_score(qa, "The kite was red. I hope this helps.") == 0.5
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
    assert demo.gold_score(prompt, "Tom had a red cat.") == 0.0  # there is nothing to check it against


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
    # every kind of element comes back in the demo's documents (in a recap, an answer or a summary)
    assert rates == {"animal": expect, "colour": expect, "obj": expect, "person": expect, "place": expect}


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
    m = gain("gold_gain", [0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0])
    assert m == pytest.approx({"gold_gain": 0.5, "gold_gain_ci_low": 0.0, "gold_gain_ci_high": 1.0})


def test_several_responses_to_a_prompt_are_resampled_together():
    # two prompts, three responses each: per prompt the gains are 1 and 0 (means of 1,1,1 and 0,0,0), so a
    # resample is all ones or all zeros with probability 1/4 each, and the interval is [0, 1]; resampling the six
    # responses on their own would give a narrower one
    before, after = [0.0] * 6, [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    m = gain("reward_gain", before, after, per_prompt=3)
    assert m == pytest.approx({"reward_gain": 0.5, "reward_gain_ci_low": 0.0, "reward_gain_ci_high": 1.0})
    single = gain("reward_gain", before, after)
    assert single["reward_gain_ci_high"] - single["reward_gain_ci_low"] < 1.0
