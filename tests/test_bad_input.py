"""Bad input across the stages, through the real commands: each case exits non-zero with a message that
names what is wrong (and the remedy), never a traceback, and leaves nothing marked complete.

The table covers configuration, references between stages and handoffs; malformed data rows are in
test_data.py, test_sft.py and test_reward.py, pretraining's inputs in test_pretrain.py, the PPO handoff
checks (tokenizer mismatch, pad == eos, no chat template) in test_ppo.py.
"""
import pytest

from tests.conftest import copy_registry, make, registry_entries

CI = "experiment=ci"

# (stage, overrides, expected in the message, needs an sft checkpoint in the registry)
CASES = {
    "negative learning rate": ("sft", "trainer.learning_rate=-1", "trainer.learning_rate must be positive", False),
    "unknown resume mode": ("sft", "resume=sometimes", "resume must be one of", False),
    "unknown KL estimator": ("ppo", "ppo.kl_estimator=k9", "ppo.kl_estimator must be k1 or k3", False),
    "unknown peft method": ("reward", "peft=qlora", "peft/qlora", False),
    "wrong type": ("reward", "trainer.per_device_train_batch_size=eight", "per_device_train_batch_size", False),
    "no pretrain checkpoint": ("sft", "", "Run `make pretrain` first", False),
    "no sft checkpoint (reward)": ("reward", "", "Run `make sft` first", False),
    "no sft checkpoint (ppo)": ("ppo", "", "Run `make sft` first", False),
    "no reward checkpoint": ("ppo", "", "Run `make reward` first", True),
    "best of a stage never run": ("sft", "init_from=reward:best", "Run `make reward` first", True),
    "missing model directory": ("sft", "init_from=/no/such/model", "'/no/such/model' is neither", False),
    "a causal LM as the reward model": ("ppo", "reward_model=sft:latest", "reward_stats.json", True),
    "unknown tokenizer text": ("pretrain", "tokenizer.extra_text=[no-such-file.jsonl]",
                               "tokenizer.extra_text: 'no-such-file.jsonl' is neither 'demo', a data preset", False),
}


@pytest.fixture
def with_sft(ci_fine_tuned):
    return ci_fine_tuned


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_clearly(case, with_sft, tmp_path):
    stage, args, expect, needs_sft = CASES[case]
    home = copy_registry(with_sft, tmp_path) if needs_sft else tmp_path / "runs"
    before = {e["id"]: e["status"] for e in registry_entries(home)} if needs_sft else {}
    r = make(stage, home, f"{CI} {args}")
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-2000:]
    assert expect in out, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    after = registry_entries(home) if home.exists() else []
    assert not [e for e in after if e["stage"] == stage and e["status"] == "complete" and e["id"] not in before]
    assert {e["id"]: e["status"] for e in after if e["id"] in before} == before  # nothing upstream touched
