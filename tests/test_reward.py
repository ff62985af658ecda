"""The reward-model stage: each preference format trains, the scoring API agrees with the stage's metric,
bad rows are named, and a missing upstream checkpoint gives the remedy."""
import json

import pytest

from pipeline import demo
from reward_model.scoring import RewardModel, as_text
from tests.conftest import complete_entries, copy_registry, make, registry_entries

CI = "experiment=ci"


@pytest.fixture
def home_with_sft(ci_fine_tuned, tmp_path):
    return copy_registry(ci_fine_tuned, tmp_path)


def complete(home, stage="reward"):
    return complete_entries(home, stage)


@pytest.mark.slow
def test_reward_trains_on_the_demo_and_the_api_agrees(home_with_sft):
    home = home_with_sft
    [sft] = complete(home, "sft")
    r = make("reward", home, f"{CI} data.num_examples=800 trainer.max_steps=60 data.eval_fraction=0.1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    [e] = complete(home)
    m = e["metrics"]
    assert e["parents"] == [sft["id"]]
    for k in ("eval_accuracy", "eval_margin", "score_mean", "score_std", "length_correlation"):
        assert k in m
    assert m["eval_accuracy"] > m["initial_eval_accuracy"]  # it learned to prefer the chosen responses
    stats = json.load(open(f"{e['path']}/reward_stats.json"))
    assert (stats["score_mean"], stats["score_std"]) == (m["score_mean"], m["score_std"])
    assert len(stats["member_mean"]) == len(stats["member_std"]) == 1  # a single model: one member
    # the scoring API, loading by registry reference, recomputes the stage's accuracy
    rm = RewardModel.load("reward:latest", root=str(home))
    pairs = [{k: p[k] for k in ("prompt", "chosen", "rejected")}
             for p in demo.generate_preferences(20, 1, heldout=True)]  # the stage's held-out pairs
    accuracy, margin = rm.pair_accuracy(pairs)
    assert accuracy == pytest.approx(m["eval_accuracy"]) and margin == pytest.approx(m["eval_margin"], rel=1e-4)
    assert rm.stats["score_std"] == m["score_std"]


@pytest.mark.slow
def test_score_is_read_at_the_eos_not_padding(home_with_sft):
    home = home_with_sft
    r = make("reward", home, f"{CI} trainer.max_steps=5")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rm = RewardModel.load("reward", root=str(home))
    prompt = [{"role": "user", "content": "Is this sentence positive or negative?\n\nMia loved the cake."}]
    short = [{"role": "assistant", "content": "Positive."}]
    long = [{"role": "assistant", "content": "Positive. " * 12}]
    alone = rm.score([prompt], [short])[0]
    batched = rm.score([prompt, prompt], [short, long])[0]  # padded to the long one's length
    assert batched == pytest.approx(alone, abs=1e-4)
    assert as_text(rm.tok, prompt, short).endswith(rm.tok.eos_token)


FORMATS = {
    "plain explicit": lambda p: {"prompt": p["prompt"][0]["content"], "chosen": p["chosen"][0]["content"],
                                 "rejected": p["rejected"][0]["content"]},
    "conversational explicit": lambda p: {k: p[k] for k in ("prompt", "chosen", "rejected")},
    "conversational implicit": lambda p: {"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]},
    "plain implicit": lambda p: {"chosen": p["prompt"][0]["content"] + " " + p["chosen"][0]["content"],
                                 "rejected": p["prompt"][0]["content"] + " " + p["rejected"][0]["content"]},
}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_preference_format_trains(home_with_sft, tmp_path, fmt):
    home = home_with_sft
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps(FORMATS[fmt](p)) for p in demo.generate_preferences(60, 4)))
    r = make("reward", home, f"{CI} data=local data.path={f} trainer.max_steps=8 data.eval_fraction=0.2")
    assert r.returncode == 0, fmt + r.stdout[-2000:] + r.stderr[-2000:]
    [e] = complete(home)
    assert e["config"]["data"]["path"] == str(f)
    held_out = 12  # 60 pairs, eval_fraction 0.2: the accuracy is a share of them
    assert e["metrics"]["eval_accuracy"] * held_out == pytest.approx(round(e["metrics"]["eval_accuracy"] * held_out))


BAD = {
    "missing chosen": ({"prompt": "Hi", "rejected": "No."}, "missing 'chosen'"),
    "identical": ({"prompt": "Hi", "chosen": "Hello.", "rejected": "Hello."}, "identical"),
    "empty response": ({"prompt": "Hi", "chosen": "Hello.", "rejected": "  "}, "empty 'rejected' response"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD))
def test_bad_pairs_are_named_by_row(home_with_sft, tmp_path, case):
    home = home_with_sft
    rows = [FORMATS["plain explicit"](p) for p in demo.generate_preferences(30, 5)]
    bad, expect = BAD[case]
    rows.insert(11, bad)
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    r = make("reward", home, f"{CI} data=local data.path={f}")
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "row 12: " in out and expect in out, out[-1500:]
    assert "Traceback" not in out and not complete(home)


@pytest.mark.slow
def test_missing_sft_gives_the_remedy(home):
    r = make("reward", home, CI)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "make sft" in out and str(home) in out and "Traceback" not in out
    assert registry_entries(home) == []


@pytest.mark.slow
def test_group_by_length_batches_pairs_of_similar_length(ci_fine_tuned, tmp_path):
    """trainer.group_by_length: far less padding than random batches on pairs of mixed lengths."""
    from datasets import Dataset
    from trl import RewardConfig
    from pipeline.trainer import CHECKPOINTING
    from pipeline.models import load_reward_model
    from reward_model.train import PairTrainer

    [sft] = complete_entries(ci_fine_tuned, "sft")
    model, tok = load_reward_model(sft["path"])
    pairs = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in demo.generate_preferences(64, 5)]

    def padding(strategy: str) -> int:
        args = RewardConfig(output_dir=str(tmp_path / strategy), per_device_train_batch_size=4, use_cpu=True,
                               train_sampling_strategy=strategy, report_to=[], seed=0, **{CHECKPOINTING: False})
        trainer = PairTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok)
        return sum(int((b["attention_mask"] == 0).sum()) for b in trainer.get_train_dataloader())

    grouped, shuffled = padding("group_by_length"), padding("random")
    assert grouped < 0.7 * shuffled, (grouped, shuffled)


@pytest.mark.slow
def test_pairs_longer_than_max_length_are_counted_and_named(home_with_sft):
    """TRL drops pairs longer than max_length from training without a word: the stage says how many."""
    r = make("reward", home_with_sft, f"{CI} trainer.max_steps=2 data.max_length=60")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "WARNING: " in r.stdout and "longer than data.max_length=60 tokens" in r.stdout
    [e] = complete(home_with_sft)
    assert 0 < e["metrics"]["pairs_over_max_length"] < 400
