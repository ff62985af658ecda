"""DPO, GRPO and RLOO on the registry: reward functions, the oracle, the wiring into TRL, and the real commands at
micro sizes (lineage, a reward model combined with functions, bad input)."""
import json
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from pipeline import demo
from pipeline.errors import PipelineError
from pipeline.rewards import demo_oracle, no_repeated_sentences, resolve_reward_function
from stages.grpo import kl_per_response
from tests.conftest import compose, copy_registry, make, registry_entries


def ci_config(stage: str, overrides=()):
    return compose(stage, ["experiment=ci", *overrides])


def test_the_oracle_is_the_demo_judge_in_trls_signature():
    [row] = demo.generate_prompts(1, 3, heldout=True)
    prompt, good = row["prompt"], row["reference"]
    flawed = demo.make_flawed(__import__("random").Random(0), prompt[-1]["content"], good, "unhelpful")
    scores = demo_oracle([prompt, prompt], [[{"role": "assistant", "content": good}],
                                            [{"role": "assistant", "content": flawed}]], task=["x", "x"])
    assert scores == [demo.gold_score(prompt[-1]["content"], good), demo.gold_score(prompt[-1]["content"], flawed)]
    assert scores[0] > scores[1]
    assert demo_oracle(["plain prompt"], ["plain text"]) == [demo.gold_score("plain prompt", "plain text")]


def test_no_repeated_sentences_counts_repeats():
    assert no_repeated_sentences([None, None], ["Tom ran. Mia sat.", "Tom ran. Tom ran. Mia sat. Tom ran."]) == \
        [0.0, -0.5]


@pytest.mark.parametrize("name, expect", [
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("pipeline.rewards:nothing_here", "has no function 'nothing_here'"),
    ("just_a_name", "give it as module:function"),
])
def test_a_bad_reward_function_is_named(name, expect):
    with pytest.raises(PipelineError, match=expect) as e:
        resolve_reward_function(name)
    assert name in str(e.value)
    assert resolve_reward_function("demo_oracle") is demo_oracle


def test_reward_sources_and_weights():
    assert ci_config("grpo").reward_model == "reward:latest"  # the default: the reward model alone
    assert ci_config("grpo", ["reward_functions=[demo_oracle]"]).reward_model is None  # functions alone
    both = ci_config("grpo", ["reward_model=reward:latest", "reward_functions=[demo_oracle]", "reward_weights=[1,2]"])
    assert both.reward_model == "reward:latest" and list(both.reward_weights) == [1, 2]
    with pytest.raises(PipelineError, match="reward_weights needs 2 weights"):
        ci_config("grpo", ["reward_model=reward:latest", "reward_functions=[demo_oracle]", "reward_weights=[1]"])
    with pytest.raises(ConfigCompositionException, match="algorithm/ppo"):  # the options are named with it
        ci_config("grpo", ["algorithm=ppo"])


def test_the_stage_wires_its_settings_into_trl(tmp_path):
    from pipeline.run import StageRun
    from stages.grpo import trainer_and_args
    from trl import GRPOTrainer, RLOOConfig, RLOOTrainer

    cfg = ci_config("grpo", ["grpo.beta=0.07", "grpo.num_generations=4", "grpo.temperature=0.9",
                           "reward_functions=[demo_oracle]", "reward_weights=[0.5]"])
    cls, args = trainer_and_args(StageRun.standalone("grpo", cfg, tmp_path))
    assert cls is GRPOTrainer and args.beta == 0.07 and args.num_generations == 4 and args.temperature == 0.9
    assert args.max_completion_length == cfg.grpo.max_completion_length and args.reward_weights == [0.5]
    assert args.loss_type == cfg.grpo.loss_type and args.learning_rate == cfg.trainer.learning_rate
    cfg = ci_config("grpo", ["algorithm=rloo"])
    cls, args = trainer_and_args(StageRun.standalone("rloo", cfg, tmp_path / "r"))
    assert cls is RLOOTrainer and isinstance(args, RLOOConfig) and args.beta == cfg.grpo.beta
    # evaluation samples as the policy was trained to (one temperature, one length)
    assert cfg.eval.temperature == cfg.grpo.temperature and cfg.eval.max_new_tokens == cfg.grpo.max_completion_length


# --- the real commands, at micro sizes ------------------------------------------------------------------------

TINY = "experiment=ci eval.num_prompts=8 trainer.max_steps=4"
GAIN = ("gold_score", "baseline_gold_score", "gold_gain", "gold_gain_ci_low", "gold_gain_ci_high", "kl",
        "response_length", "eos_rate")


def new_entries(home: Path, before: set) -> list[dict]:
    return [e for e in registry_entries(home) if e["id"] not in before]


@pytest.mark.slow
def test_dpo_from_sft_and_its_bad_pairs(ci_fine_tuned, tmp_path):
    home = copy_registry(ci_fine_tuned, tmp_path)
    [sft] = registry_entries(home, "sft")
    r = make("dpo", home, f"{TINY} eval.samples_per_prompt=2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    [e] = registry_entries(home, "dpo")
    assert e["status"] == "complete" and e["parents"] == [sft["id"]]
    m = e["metrics"]
    assert all(k in m for k in GAIN) and m["global_step"] == 4
    assert m["gold_gain_ci_low"] <= m["gold_gain"] <= m["gold_gain_ci_high"]
    # the policy moved away from its start, the start did not (a mean of sampled log-ratios: either sign)
    assert m["kl"] != 0 and m["baseline_kl"] == 0
    assert 0 <= m["implicit_reward_accuracy"] <= 1 and "reward_mean" not in m  # no reward model involved
    rows = [json.loads(l) for l in open(Path(e["path"]) / "samples.jsonl")]
    # each of the 8 held-out prompts answered twice by each model, side by side; the gain is over the 8 prompts
    assert len(rows) == 16 and {"sft", "dpo", "sft_gold", "dpo_gold"} <= set(rows[0])
    assert rows[0]["prompt"] == rows[1]["prompt"] != rows[2]["prompt"]
    assert m["eval_prompts"] == 8 and m["eval_samples_per_prompt"] == 2
    per_prompt = [sum(r["dpo_gold"] - r["sft_gold"] for r in rows[i:i + 2]) / 2 for i in range(0, 16, 2)]
    assert m["gold_gain"] == pytest.approx(sum(per_prompt) / 8)
    # a pairs file with a missing field: named with its row, exit 2, nothing complete, the SFT entry untouched
    pairs = tmp_path / "pairs.jsonl"
    good = {"prompt": "Is tea good?", "chosen": "Yes.", "rejected": "No."}
    pairs.write_text("\n".join(json.dumps(x) for x in [good] * 5 + [{"prompt": "Hi?", "chosen": "Hello."}] + [good]))
    before = {x["id"] for x in registry_entries(home)}
    r = make("dpo", home, f"{TINY} data=local data.path={pairs}")
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "row 6" in out and "rejected" in out and "Traceback" not in out, out[-2000:]
    assert not [x for x in new_entries(home, before) if x["status"] == "complete"]
    assert [x["status"] for x in registry_entries(home, "sft")] == ["complete"]


@pytest.mark.slow
def test_grpo_and_rloo_with_a_reward_model_and_functions(ci_fine_tuned, tmp_path):
    home = copy_registry(ci_fine_tuned, tmp_path)
    [sft] = registry_entries(home, "sft")
    # a reward function that cannot be imported: named, exit 2, no entry at all
    r = make("grpo", home, f"{TINY} reward_functions=[no_such_module_xyz:score]")
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "no_such_module_xyz" in out and "Traceback" not in out, out[-2000:]
    assert not registry_entries(home, "grpo")
    r = make("reward", home, "experiment=ci trainer.max_steps=10")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    [rw] = registry_entries(home, "reward")

    # the reward model and a function together, weighed
    r = make("grpo", home, f"{TINY} reward_model=reward:latest "
                           f"reward_functions=[pipeline.rewards:no_repeated_sentences] reward_weights=[1.0,2.0]",
             PIPELINE_ID="pipeline-align")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    [e] = registry_entries(home, "grpo")
    assert e["status"] == "complete" and sorted(e["parents"]) == sorted([sft["id"], rw["id"]])
    m = e["metrics"]
    assert all(k in m for k in GAIN + ("reward_mean", "baseline_reward_mean")) and m["oracle"] is False
    history = json.load(open(Path(e["path"]) / "grpo_history.json"))["log"]
    assert len(history) == 4
    # the stall warning reads each log's KL per response: TRL's per-token KL times the mean length
    assert all(kl_per_response(h) == pytest.approx(h["kl"] * h["completions/mean_length"]) for h in history)
    sources = {k for h in history for k in h if k.startswith("rewards/") and k.endswith("/mean")}
    assert any("no_repeated_sentences" in k for k in sources) and len(sources) == 2, sources

    # RLOO against the oracle alone: its own stage, the SFT parent only, marked oracle
    r = make("grpo", home, f"{TINY} algorithm=rloo reward_functions=[demo_oracle]", PIPELINE_ID="pipeline-align")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "oracle" in r.stdout
    [e] = registry_entries(home, "rloo")
    assert e["status"] == "complete" and e["parents"] == [sft["id"]]
    assert e["metrics"]["oracle"] is True and "reward_mean" not in e["metrics"]

    # the pipeline run's report compares the two, the oracle labelled as the upper bound
    r = make("report", home, PIPELINE_ID="pipeline-align")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = home / "pipelines" / "pipeline-align"
    page = (out / "report.md").read_text()
    table = page[page.index("## Alignment methods side by side"):]
    rows = [l for l in table.splitlines() if l.startswith("| GRPO") or l.startswith("| RLOO")]
    assert len(rows) == 2 and "oracle: upper bound" in rows[1] and "oracle" not in rows[0]
    assert f"{e['metrics']['gold_gain']:+.3f} [{e['metrics']['gold_gain_ci_low']:+.3f}, " in rows[1]
    assert (out / "comparison" / "gold_by_method.png").read_bytes()[:4] == b"\x89PNG"
    assert "](comparison/gold_by_method.png)" in page and "grpo_curves.png" in page
    r = make("compare", home)  # the same table for any SFT entry
    assert r.returncode == 0 and "| RLOO (demo_oracle, oracle: upper bound) |" in r.stdout, r.stdout[-2000:]
