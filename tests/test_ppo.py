"""PPO's RLHF details, each tested so that removing it fails a test, and the stage's handoff checks."""
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification
from trl.experimental.ppo.ppo_trainer import truncate_response
from trl.experimental.utils import get_reward

from pipeline import demo
from pipeline.errors import PipelineError
from pipeline.run import StageRun
from pipeline.tokenizer import train_bpe
from pipeline.handoff import check_reward_handoff
from stages.alignment import BudgetExceeded, KLBudget, RewardStall
from stages.ppo import kl_per_response, ppo_arguments
from tests.conftest import compose


@pytest.fixture(scope="module")
def tok():
    return train_bpe(demo.generate_corpus(300, 0), 400, 128)


def ppo_config(overrides=()):
    return compose("ppo", ["experiment=ci", *overrides])


def reward_model(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, num_labels=1, pad_token_id=tok.pad_token_id)
    return LlamaForSequenceClassification(cfg).eval()


def test_score_is_read_at_the_eos_not_at_padding(tok):
    rm = reward_model(tok)
    query = torch.tensor([tok("Is it good?")["input_ids"]])
    response = tok("Yes.")["input_ids"] + [tok.eos_token_id]
    padded = torch.tensor([response + [tok.pad_token_id] * 5])
    _, score, _ = get_reward(rm, torch.cat([query, padded], 1), tok.pad_token_id, query.shape[1])
    with torch.no_grad():
        at_eos = rm(input_ids=torch.cat([query, torch.tensor([response])], 1)).logits[0, 0]
    assert score.item() == pytest.approx(at_eos.item(), abs=1e-5)
    # with pad == eos the score would be read one token early: the handoff check refuses that tokenizer
    bad = train_bpe(demo.generate_corpus(50, 0), 300, 64)
    bad.pad_token = bad.eos_token
    with pytest.raises(PipelineError, match="pad token must differ from eos"):
        check_reward_handoff(bad, bad, "sft-x", "reward-y")


def test_tokens_after_the_stop_token_are_masked(tok):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    responses = torch.tensor([[5, 6, eos, 7, 8, 9], [5, 6, 7, 8, 9, 10]])
    out = truncate_response(eos, pad, responses)
    assert out[0].tolist() == [5, 6, eos, pad, pad, pad]
    assert out[1].tolist() == [5, 6, 7, 8, 9, 10]  # no eos: kept whole, and penalised (below)


def test_the_stage_wires_each_detail_into_trl(tmp_path):
    cfg = ppo_config(["ppo.missing_eos_penalty=2.5", "ppo.kl_coef=0.3", "ppo.temperature=0.9"])
    args = ppo_arguments(StageRun.standalone("ppo", cfg, tmp_path))
    assert args.stop_token == "eos"  # truncation at the stop token; score read at the eos
    assert args.missing_eos_penalty == 2.5  # a response without eos is penalised
    assert args.kl_coef == 0.3 and args.kl_estimator == "k1"  # per-token KL to the reference
    assert args.temperature == 0.9  # one temperature for sampling and log-probabilities
    assert args.gamma == 1.0 and args.lam == 0.95  # GAE
    assert args.total_episodes == cfg.trainer.max_steps * cfg.trainer.per_device_train_batch_size


def test_kl_budget_stops_and_records():
    cb = KLBudget(5.0, kl_per_response)
    state = SimpleNamespace(global_step=7)
    cb.on_log(None, state, None, logs={"objective/kl": 4.0})
    assert cb.fired_at is None
    with pytest.raises(BudgetExceeded):
        cb.on_log(None, state, None, logs={"objective/kl": 6.0})
    assert cb.fired_at == {"step": 7, "kl": 6.0}
    # GRPO's budget is in nats per response too: TRL's 0.3 per token over 20-token responses is 6
    from stages.grpo import kl_per_response as grpo_kl
    grpo = KLBudget(5.0, grpo_kl)
    with pytest.raises(BudgetExceeded):
        grpo.on_log(None, state, None, logs={"kl": 0.3, "completions/mean_length": 20.0})
    assert grpo.fired_at["kl"] == pytest.approx(6.0)


def stall_log(cb, rows, kl_key="objective/kl", reward_key="objective/scores", **extra):
    """Feed (reward, kl) rows to the callback as consecutive logs; the steps at which it warned."""
    fired = []
    for reward, kl in rows:
        step = len(cb.rewards) + 1
        before = cb.fired_at
        cb.on_log(None, SimpleNamespace(global_step=step), None, logs={reward_key: reward, kl_key: kl, **extra})
        if cb.fired_at is not before:
            fired.append(step)
    return fired


def test_the_stall_warning_fires_when_the_kl_grows_and_the_reward_does_not():
    warnings = []
    cb = RewardStall(1.5, False, warnings.append, "objective/scores", lambda log: log.get("objective/kl"))
    w = RewardStall.WINDOW
    # the reward rises at a KL of 1: every window is a new best
    assert stall_log(cb, [(0.1 * i, 1.0) for i in range(1, 2 * w + 1)]) == [] and not warnings
    assert cb.best["step"] == 2 * w and cb.best["kl"] == pytest.approx(1.0)
    # then no higher while the KL climbs to 3: the window's KL passes 1.5 the second such update
    flat = [(0.0, 3.0)] * w
    fired = stall_log(cb, flat)
    assert fired == [2 * w + 2] and cb.fired_at["best"]["step"] == 2 * w and len(warnings) == 1
    assert cb.fired_at["kl"] == pytest.approx(1.5) and "stall_stop=true would stop" in warnings[0]
    assert stall_log(cb, flat) == []  # once
    metrics = {}
    cb.record(SimpleNamespace(log=print), metrics)
    assert metrics == {"stall_warning_step": 2 * w + 2, "stall_best_step": 2 * w}

    # flat reward with the KL near the start: growth by a ratio from almost nothing is not drift
    near = RewardStall(1.5, False, warnings.append, "objective/scores", lambda log: log.get("objective/kl"))
    assert stall_log(near, [(0.3, 0.01 * i) for i in range(1, 5 * w)]) == []
    # the reward falling as the KL grows (a task breaking) is a stall as well; with stall_stop the run stops
    stopping = RewardStall(1.5, True, warnings.append, "objective/scores", lambda log: log.get("objective/kl"))
    with pytest.raises(BudgetExceeded):
        stall_log(stopping, [(0.5 - 0.02 * i, 0.6 + 0.2 * i) for i in range(4 * w)])
    assert stopping.stopped


def test_grpo_reads_the_stall_in_nats_per_response():
    """TRL logs GRPO's KL per token; the stall budget's floor is in nats per response, as PPO's KL."""
    from stages.grpo import kl_per_response
    rows = [(0.5, 0.02)] * RewardStall.WINDOW + [(0.5, 0.06)] * RewardStall.WINDOW
    cb = RewardStall(1.5, False, print, "reward", kl_per_response)
    assert stall_log(cb, rows, kl_key="kl", reward_key="reward", **{"completions/mean_length": 20.0}) != []
    short = RewardStall(1.5, False, print, "reward", kl_per_response)  # the same per-token KL, 2-token responses
    assert stall_log(short, rows, kl_key="kl", reward_key="reward", **{"completions/mean_length": 2.0}) == []
    assert kl_per_response({"reward": 0.5}) is None  # beta 0: no KL logged, nothing observed


def test_tokenizer_mismatch_names_both_checkpoints(tok):
    other = train_bpe(demo.generate_corpus(300, 1), 350, 128)
    with pytest.raises(PipelineError) as e:
        check_reward_handoff(tok, other, "sft-aaa", "reward-bbb")
    assert "sft-aaa" in str(e.value) and "reward-bbb" in str(e.value) and "vocabulary size" in str(e.value)
    check_reward_handoff(tok, tok, "sft-aaa", "reward-bbb")  # identical tokenizers pass


def test_pad_equal_to_eos_and_a_missing_chat_template_are_refused(tok):
    import copy
    same = copy.deepcopy(tok)
    same.pad_token = same.eos_token
    with pytest.raises(PipelineError, match="reward-bbb: the pad token must differ from eos"):
        check_reward_handoff(tok, same, "sft-aaa", "reward-bbb")
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(PipelineError, match="sft-aaa: the tokenizer has no chat template"):
        check_reward_handoff(bare, tok, "sft-aaa", "reward-bbb")


# --- the real command, at micro sizes -------------------------------------------------------------

from tests.conftest import copy_registry, make, registry_entries  # noqa: E402

TINY = "experiment=ci eval.num_prompts=16 ppo.gold_every=2 ppo.gold_prompts=8"


@pytest.mark.slow
def test_ppo_runs_after_sft_and_reward_with_both_parents(home, ci_fine_tuned, tmp_path):
    r = make("ppo", home, "experiment=ci")
    assert r.returncode != 0 and "make sft" in r.stdout + r.stderr and "Traceback" not in r.stdout + r.stderr
    home = copy_registry(ci_fine_tuned, tmp_path / "with_sft")
    r = make("ppo", home, "experiment=ci")
    assert r.returncode != 0 and "make reward" in r.stdout + r.stderr
    assert not [e for e in registry_entries(home, "ppo")]
    r = make("reward", home, "experiment=ci trainer.max_steps=10")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = make("ppo", home, f"{TINY} trainer.max_steps=4")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    [sft], [rw], [e] = (registry_entries(home, s) for s in ("sft", "reward", "ppo"))
    assert e["status"] == "complete" and sorted(e["parents"]) == sorted([sft["id"], rw["id"]])
    m = e["metrics"]
    for k in ("reward_mean", "baseline_reward_mean", "gold_score", "baseline_gold_score", "kl", "response_length",
              "eos_rate"):
        assert k in m
    assert m["ppo_steps"] == 4
    # 16 held-out prompts: the figure is given, and said to be too few to conclude from
    assert m["eval_prompts"] == 16 and "only 16 held-out prompts: too few for the reward or gold gain" in r.stdout
    import json, os
    history = json.load(open(os.path.join(e["path"], "ppo_history.json")))
    assert len(history["log"]) == 4 and [g["step"] for g in history["gold"]] == [2, 4]
    assert os.path.exists(os.path.join(e["path"], "samples.md"))
    # a rerun of a killed PPO attempt restarts cleanly and says so
    from pipeline.registry import Registry
    reg = Registry(home)
    dead = reg.create("ppo", e["config"], e["parents"], cfg_hash=e["config_hash"])
    reg.update(dead, pid=2 ** 22 + 4321)
    r = make("ppo", home, f"{TINY} trainer.max_steps=4")
    assert r.returncode == 0 and f"{dead.id} cannot be resumed" in r.stdout
    assert reg.get(dead.id).status == "failed"
    # a file of 120 prompts of the user's own, that begin like the demo's: the demo's judge is not run on them,
    # nothing crashes; a third of them is held out (not data.eval_fraction's 2), and the reward gain over the start
    # comes with its interval and the number of prompts it rests on
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"{p} ({i})"}) for i, p in enumerate([
        "Write a short story about Tom and a red cat at the park.", "Summarize the story in one sentence.",
        "Read the story and answer the question. Who is Tom?",
        "Is this sentence positive or negative? I like tea."] * 30)))
    r = make("ppo", home, f"experiment=ci ppo.gold_every=0 trainer.max_steps=2 trainer.per_device_train_batch_size=4 "
                          f"data=local data.path={prompts} eval.num_prompts=200")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    local = [e for e in registry_entries(home, "ppo") if e["config"]["data"]["kind"] == "file"]
    assert [e["status"] for e in local] == ["complete"]
    m = local[0]["metrics"]
    assert "reward_mean" in m and not {"gold_score", "baseline_gold_score"} & set(m)
    assert m["eval_prompts"] == 40 and "80 training prompts, 40 held-out prompts" in r.stdout
    assert m["reward_gain_ci_low"] <= m["reward_gain"] <= m["reward_gain_ci_high"]
    assert m["reward_gain"] == pytest.approx(m["reward_mean"] - m["baseline_reward_mean"], abs=1e-6)
    assert "too few for the reward or gold gain" not in r.stdout


def test_the_summary_names_the_update_the_stall_warning_fired_at():
    from pipeline.report import summary_table
    for stage in ("ppo", "grpo", "rloo"):
        e = SimpleNamespace(stage=stage, id=f"{stage}-x", status="complete", finished_at=None,
                            metrics={"gold_gain": 0.1, "stall_warning_step": 21, "stall_stop_step": 21})
        row = summary_table([e]).splitlines()[1]
        assert "stall_warning_step=21" in row and "stall_stop_step=21" in row
