"""Reward-model ensembles: K separately trained models, or K score heads on one backbone, trained into one entry and
scored as one (mean and disagreement); the conservative rewards the online methods train on; the disagreement guard; and the
over-optimisation bench (bench/overopt.py) end to end at micro sizes."""
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaForSequenceClassification
from trl.experimental.utils import get_reward

from bench.overopt import curve, gao_fit, gold_drop_update
from pipeline import demo
from pipeline.errors import PipelineError
from pipeline.models import ENSEMBLE_FILE, MemberStack, Unpadded, load_reward_model, reward_members
from pipeline.registry import Registry
from pipeline.tokenizer import train_bpe
from reward_model.scoring import RewardModel
from stages.alignment import BudgetExceeded, Disagreement, EnsembleReward, load_scorer, value_model
from tests.conftest import ROOT, compose, copy_registry, env_for, run_stages


def fixed_head(*rows):
    """A linear score head whose member k scores a hidden vector of ones as rows[k]."""
    head = torch.nn.Linear(1, len(rows), bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(rows).unsqueeze(1))
    return head


@pytest.mark.parametrize("combine,expected", [
    ("none", (0.0 + 2.0 + 4.0) / 3),
    ("mean_minus_std", 2.0 - 0.5 * math.sqrt(8 / 3)),
    ("min", 0.0),
])
def test_members_are_normalised_then_combined(combine, expected):
    # raw scores 1, 3, 9; normalised by each member's mean and std: (1-1)/1, (3-1)/1, (9-1)/2 = 0, 2, 4
    head = EnsembleReward(fixed_head(1.0, 3.0, 9.0), mean=[1.0, 1.0, 1.0], std=[1.0, 1.0, 2.0], combine=combine,
                          coef=0.5)
    out = head(torch.ones(1, 2, 1))  # (batch, tokens, hidden)
    assert out.shape == (1, 2, 1)
    assert out[0, 0, 0].item() == pytest.approx(expected, rel=1e-5)


def test_a_single_model_is_standardised_as_before():
    head = EnsembleReward(fixed_head(4.0), mean=[2.0], std=[4.0])
    assert head(torch.ones(1, 3, 1))[0, 0, 0].item() == pytest.approx((4.0 - 2.0) / 4.0)
    assert head.read == []  # nothing to disagree about


@pytest.fixture(scope="module")
def tok():
    return train_bpe(demo.generate_corpus(300, 0), 400, 128)


def saved_ensemble(tok, path, members=3):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, num_labels=members, pad_token_id=tok.pad_token_id)
    model = LlamaForSequenceClassification(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model.eval()


def saved_members(tok, path, members=3):
    """An ensemble of separately initialised one-output models, saved as `make reward` saves the models kind; the
    plain members back."""
    plain = []
    for i in range(members):
        plain.append(saved_ensemble(tok, path / "members" / str(i), members=1))
        torch.manual_seed(100 + i)
        with torch.no_grad():  # each its own weights, not only its own head
            for p in plain[-1].parameters():
                p.add_(0.05 * torch.randn_like(p))
        plain[-1].save_pretrained(path / "members" / str(i))
    tok.save_pretrained(path)
    (path / ENSEMBLE_FILE).write_text(json.dumps({"kind": "models", "members": [f"members/{i}" for i in range(members)]}))
    return plain


class Members(torch.nn.Module):
    """The plain members' scores side by side, (batch, members): what their stack must give."""

    def __init__(self, plain):
        super().__init__()
        self.plain = plain

    def forward(self, **batch):
        return SimpleNamespace(logits=torch.cat([m(**batch).logits for m in self.plain], -1))


def ensemble_of(kind, tok, path):
    return saved_ensemble(tok, path) if kind == "heads" else Members(saved_members(tok, path))


def test_separate_models_load_as_one_model_with_an_output_each(tok, tmp_path):
    plain = Members(saved_members(tok, tmp_path))
    stack, _ = load_reward_model(str(tmp_path))
    assert isinstance(stack, MemberStack) and reward_members(str(tmp_path)) == 3 and stack.config.num_labels == 3
    tok.padding_side = "right"
    batch = tok(["Once upon a time there was a cat.", "Yes."], padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = stack(**batch).logits
    assert scores.shape == (2, 3)
    assert torch.allclose(scores, plain(**batch).logits, atol=1e-5)  # each member read at its own last token
    assert scores.std(1).min() > 1e-3  # the members differ


@pytest.mark.parametrize("kind", ["heads", "models"])
def test_disagreement_is_read_where_the_reward_is_read(tok, tmp_path, kind):
    """TRL's PPO reads the reward at each response's last token before padding; the members' std is kept at the
    same token, and the combined reward there is the members' normalised mean."""
    model = ensemble_of(kind, tok, tmp_path)
    stats = {"member_mean": [0.0, 0.0, 0.0], "member_std": [1.0, 1.0, 1.0]}
    scorer, _ = load_scorer(str(tmp_path), False, stats)
    query = torch.tensor([tok("Is it good?")["input_ids"]] * 2)
    responses = [tok("Yes.")["input_ids"] + [tok.eos_token_id], tok("No, it is not.")["input_ids"] + [tok.eos_token_id]]
    width = max(map(len, responses)) + 3
    padded = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in responses])
    _, reward, ends = get_reward(scorer, torch.cat([query, padded], 1), tok.pad_token_id, query.shape[1])
    with torch.no_grad():
        members = torch.stack([model(input_ids=torch.cat([query[:1], torch.tensor([r])], 1)).logits[0]
                               for r in responses])  # (2, members), each read at its own eos
    assert reward.tolist() == pytest.approx(members.mean(1).tolist(), abs=1e-5)
    assert torch.tensor(scorer.score.read) == pytest.approx(members, abs=1e-5)  # each member, normalised, where read


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # rotary positions, and absolute ones that must be carried over
def test_an_unpadded_backbone_gives_every_kept_token_the_full_calls_hidden_state(tok, tmp_path, arch):
    """Rows padded on both sides, as PPO's rollouts are, run in buckets of two rows: at every kept token the hidden
    state and its gradient are the full padded call's, with TRL's positions or the model's own."""
    if arch == "llama":
        backbone = saved_ensemble(tok, tmp_path, members=1).model
    else:
        torch.manual_seed(0)
        backbone = GPT2Model(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=128)).eval()
    pad = tok.pad_token_id
    texts = ["Once upon a time there was a cat.", "Yes.", "The hat was red and the dog ran.", "No."]
    rows = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, rows)) + 4
    lefts = [3, 0, 1, 2]  # left padding of each row; the rest of its width is right padding
    ids = torch.tensor([[pad] * l + r + [pad] * (width - l - len(r)) for l, r in zip(lefts, rows)])
    mask = ids != pad
    unpadded = Unpadded(backbone, bucket=2)
    for positions in (mask.cumsum(1) - mask.long(), None):  # TRL's get_reward passes these; a plain call, none
        full = backbone(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        packed = unpadded(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        assert packed.shape == full.shape
        assert torch.allclose(packed[mask], full[mask], atol=1e-5)
        assert (packed[~mask] == 0).all()
        weights = torch.randn_like(full)
        embeddings = backbone.get_input_embeddings().weight
        grad_full = torch.autograd.grad((full[mask] * weights[mask]).sum(), embeddings)[0]
        grad_packed = torch.autograd.grad((packed[mask] * weights[mask]).sum(), embeddings)[0]
        assert torch.allclose(grad_packed, grad_full, atol=1e-5) and grad_full.abs().sum() > 0


def test_the_value_model_of_separate_models_is_the_first_member(tok, tmp_path):
    plain = saved_members(tok, tmp_path)
    value = value_model(str(tmp_path), False)
    ids = torch.tensor([tok("Once upon a time")["input_ids"]])
    with torch.no_grad():
        assert value(input_ids=ids).logits[0, 0].item() == pytest.approx(plain[0](input_ids=ids).logits[0, 0].item(),
                                                                         abs=1e-5)


def test_the_value_model_starts_as_the_members_mean(tok, tmp_path):
    model = saved_ensemble(tok, tmp_path)
    value = value_model(str(tmp_path), False)
    ids = torch.tensor([tok("Once upon a time")["input_ids"]])
    with torch.no_grad():
        assert value(input_ids=ids).logits.shape == (1, 1)
        assert value(input_ids=ids).logits[0, 0].item() == pytest.approx(model(input_ids=ids).logits[0].mean().item(),
                                                                         abs=1e-5)


def test_the_scoring_api_gives_the_mean_and_the_disagreement(tok, tmp_path):
    model = saved_ensemble(tok, tmp_path)
    rm = RewardModel(model, tok, {"member_mean": [0.0, 1.0, 2.0], "member_std": [1.0, 2.0, 4.0]})
    scores, spread = rm.score_with_disagreement(["Tell me a story."], ["Once upon a time."])
    members = rm.member_scores(["Tell me a story."], ["Once upon a time."])[0]
    assert scores[0] == pytest.approx(members.mean().item(), abs=1e-6)
    z = (members - torch.tensor([0.0, 1.0, 2.0])) / torch.tensor([1.0, 2.0, 4.0])
    assert spread[0] == pytest.approx(z.std(unbiased=False).item(), abs=1e-6)


def logged(cb, step, rows):
    cb.head.read.extend(rows)
    state = SimpleNamespace(global_step=step, log_history=[{"step": step}])
    cb.on_log(None, state, None, logs={})
    return state.log_history[-1]


def spread(std):
    """Two members' normalised scores of one response whose std is `std`."""
    return [-std, std]


def test_the_disagreement_guard_warns_past_its_budget_and_stops_when_asked():
    warnings = []
    head = lambda: SimpleNamespace(read=[], mean=torch.zeros(1))
    cb = Disagreement(head(), budget=2.0, stop=False, warn=warnings.append)
    start = logged(cb, 1, [spread(0.1), spread(0.3)])
    assert start[Disagreement.KEY] == pytest.approx(0.2)  # the start's: the reference
    logged(cb, 2, [spread(0.35)])
    assert not warnings and cb.fired_at is None  # 1.75x: within the budget
    logged(cb, 3, [spread(0.5)])
    assert cb.fired_at["step"] == 3 and len(warnings) == 1 and "2.5x" in warnings[0]
    logged(cb, 4, [spread(0.9)])
    assert len(warnings) == 1  # once
    metrics = {}
    cb.record(SimpleNamespace(log=print), metrics)
    assert metrics["disagreement_warning_step"] == 3 and "disagreement_stop_step" not in metrics
    assert metrics["ensemble_std_start"] == pytest.approx(0.2) and metrics["ensemble_std_final"] == pytest.approx(0.9)

    stopping = Disagreement(head(), budget=2.0, stop=True, warn=warnings.append)
    logged(stopping, 1, [spread(0.2)])
    with pytest.raises(BudgetExceeded):
        logged(stopping, 2, [spread(0.5)])


def test_each_members_mean_score_on_the_rollouts_is_logged_beside_their_disagreement():
    cb = Disagreement(SimpleNamespace(read=[], mean=torch.zeros(1)), budget=None, stop=False, warn=print)
    cb.head.read.extend([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    cb.on_step_end(None, SimpleNamespace(global_step=1), None)
    cb.head.read.extend([[1.0, 3.0, -1.0]])
    row = logged(cb, 2, [])  # two updates in one log: the mean of their figures
    assert [row[Disagreement.MEMBER.format(i)] for i in range(3)] == pytest.approx([1.0, 2.0, 0.0])
    assert cb.history[1]["members"] == pytest.approx([1.0, 3.0, -1.0])
    assert row[Disagreement.KEY] == pytest.approx((0.8165 + 1.633) / 2, abs=1e-3)


def test_the_report_draws_every_members_score_in_one_panel_after_the_disagreement():
    from pipeline.report import policy_panels
    log = [{"step": 1, "objective/scores": 0.1, "objective/kl": 0.0, Disagreement.KEY: 0.3,
            **{Disagreement.MEMBER.format(i): 0.1 * i for i in range(12)}}]
    panels = policy_panels("ppo", log)
    assert [keys for keys, _ in panels][2:] == [[Disagreement.KEY], [Disagreement.MEMBER.format(i) for i in range(12)]]
    assert len(policy_panels("ppo", [{"step": 1, "objective/scores": 0.1, "objective/kl": 0.0}])) == 2  # one model


@pytest.mark.parametrize("overrides,match", [
    (["ppo.reward_uncertainty=pessimistic"], "reward_uncertainty must be one of none, mean_minus_std, min"),
    (["ppo.disagreement_budget=0"], "disagreement_budget must be positive"),
    (["ppo.stall_budget=1.0"], "stall_budget must be above 1"),
])
def test_bad_guard_settings_are_named(overrides, match):
    with pytest.raises(PipelineError, match=match):
        compose("ppo", ["experiment=ci", *overrides])


@pytest.mark.parametrize("overrides,match", [
    ("reward.ensemble_size=0", "reward.ensemble_size must be at least 1"),
    ("reward.ensemble_kind=stacked", "reward.ensemble_kind must be one of models, heads, got 'stacked'"),
    ("reward.ensemble_init=[a,b]", "give 1 with reward.ensemble_size=1 .* got 2"),
    ("reward.ensemble_data=[{},{}]", "one per member .* got 2 with ensemble_size=1"),
    ("reward.ensemble_size=2 reward.ensemble_data=[{swap_elements:[persn]},{}]",
     r"reward.ensemble_data\[0\]: data.swap_elements: unknown element\(s\) \['persn'\]"),
    ("reward.ensemble_size=2 reward.ensemble_data=[{},{num_exampels:5}]", r"reward.ensemble_data\[1\]: .*num_exampels"),
])
def test_bad_ensemble_settings_are_named(overrides, match):
    with pytest.raises(PipelineError, match=match):
        compose("reward", ["experiment=ci", *overrides.split()])


def test_gao_fit_recovers_its_parameters_and_the_drop_is_found():
    alpha, beta = 0.3, 0.2
    points = [{"update": 0, "gold": 0.5, "sqrt_kl": 0.0}] + [
        {"update": 4 * i, "gold": 0.5 + d * (alpha - beta * math.log(d)), "sqrt_kl": d}
        for i, d in enumerate([0.5, 1.0, 2.0, 3.0, 4.0, 5.0], 1)]
    fit = gao_fit(points)
    assert fit["alpha"] == pytest.approx(alpha, abs=1e-6) and fit["beta"] == pytest.approx(beta, abs=1e-6)
    assert fit["peak_sqrt_kl"] == pytest.approx(math.exp(alpha / beta - 1), rel=1e-6)
    # of the points, gold peaks at the third (update 12) and first falls DROP below that at the fourth (update 16)
    assert gold_drop_update(points) == 16
    assert gold_drop_update([{"update": 0, "gold": 0.5}, {"update": 4, "gold": 0.6}]) is None


@pytest.mark.parametrize("stage,key", [("ppo", "objective/scores"), ("grpo", "reward")])
def test_the_curve_starts_with_the_start_policys_proxy_and_averages_it_between_checks(tmp_path, stage, key):
    """A run whose gold peaks at the start still has a proxy there: its first update's, drawn from the start. Each
    check's proxy is the mean of the updates since the last check, not its own update's batch alone."""
    (tmp_path / f"{stage}_history.json").write_text(json.dumps({
        "log": [{"step": 1, key: 0.25, "lr": 1e-5}, {"step": 2, key: 0.45}, {"step": 3, key: 0.3},
                {"step": 4, key: 0.5}],
        "gold": [{"step": 2, "gold_score": 0.6, "score": 0.45, "kl": 0.81},
                 {"step": 4, "gold_score": 0.5, "score": 0.5, "kl": 1.0}]}))
    entry = SimpleNamespace(path=str(tmp_path), stage=stage, metrics={"baseline_gold_score": 0.7})
    start, second, fourth = curve(entry)
    assert (start["update"], start["gold"], start["proxy"], start["sqrt_kl"]) == (0, 0.7, 0.25, 0.0)
    assert (second["update"], second["gold"]) == (2, 0.6) and second["proxy"] == pytest.approx(0.35)
    assert (fourth["update"], fourth["gold"]) == (4, 0.5) and fourth["proxy"] == pytest.approx(0.4)
    assert second["sqrt_kl"] == pytest.approx(0.9)


@pytest.mark.slow
def test_overopt_trains_an_ensemble_and_runs_guarded_and_unguarded(ci_fine_tuned, tmp_path):
    """make overopt at micro sizes: the ensemble entry records its members; both PPO runs log the members'
    disagreement and each member's score on their rollouts; the guarded one trains on the worst case (--guard
    min); overopt.json has the figures the bench promises for the seed."""
    home = copy_registry(ci_fine_tuned, tmp_path)
    r = subprocess.run(["make", "--no-print-directory", "overopt",
                        "ARGS=--scale ci --methods ppo --seeds 0 --budget 0.25 --every 2 --prompts 8 --members 2 --guard min"],
                       cwd=ROOT, env=env_for(home), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    registry = Registry(str(home))
    reward = registry.resolve("reward:latest").entry
    m = reward.metrics
    assert m["ensemble_size"] == 2 and {f"eval_accuracy/member_{i}" for i in range(2)} <= set(m)
    assert m["eval_disagreement"] > 0  # the members differ
    # the default kind: separately trained models, each on its own share of the pairs for half the steps
    listed = json.loads((Path(reward.path) / "ensemble.json").read_text())["members"]
    weights = [load_file(str(Path(reward.path) / f / "model.safetensors")) for f in listed]
    assert len(weights) == 2 and not torch.equal(weights[0]["score.weight"], weights[1]["score.weight"])
    assert not torch.equal(weights[0]["model.norm.weight"], weights[1]["model.norm.weight"])  # backbones trained apart
    steps = compose("reward", ["experiment=ci"]).trainer.max_steps
    assert m["global_step"] == 2 * math.ceil(steps * 0.5)
    exported = tmp_path / "exported"  # exported whole, members and all, and scored as one from the folder
    r = subprocess.run([sys.executable, "-m", "pipeline.registry", "export", reward.id, str(exported)], cwd=ROOT,
                       env=env_for(home), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert RewardModel.load(str(exported)).members == 2
    assert any(k.startswith("eval_disagreement/") for k in m)  # per flaw class, on the demo
    stats = json.loads((Path(reward.path) / "reward_stats.json").read_text())
    assert len(stats["member_mean"]) == 2 and len(stats["member_std"]) == 2

    out = json.loads((home / "overopt.json").read_text())
    seed = out["seeds"][0]
    for key in ("gold_peak", "gold_peak_update", "gold_final", "swap_start", "swap_final",
                "proxy_final_minus_at_peak", "warning_update", "stall_update", "gold_drop_update"):
        assert key in seed["unguarded"], key
    assert {"gold", "ci_low", "ci_high"} <= set(seed["guarded_minus_unguarded"])
    assert {"alpha", "beta"} <= set(seed["gao_fit"])
    assert (home / "overopt.png").stat().st_size > 0
    runs = {mode: registry.get(seed[mode]["entry"]) for mode in ("unguarded", "guarded")}
    assert runs["unguarded"].config["ppo"]["reward_uncertainty"] == "none"
    assert runs["guarded"].config["ppo"]["reward_uncertainty"] == "min" and out["settings"]["guard"] == "min"
    assert out["settings"]["budget"] == {"ppo": 0.25}  # the budget each method ran at
    for e in runs.values():
        assert reward.id in e.parents
        assert e.metrics["ensemble_std_start"] > 0 and "ensemble_std" in e.metrics
        history = json.loads((Path(e.path) / "ppo_history.json").read_text())
        assert all(Disagreement.KEY in h and Disagreement.MEMBER.format(1) in h for h in history["log"])
        assert len(history["disagreement"]) == 4 and all(len(h["members"]) == 2 for h in history["disagreement"])


def test_backbones_that_read_text_differently_are_refused_before_an_entry_is_made(tok, tmp_path):
    from reward_model.train import inputs
    other = train_bpe(demo.generate_corpus(300, 1), 380, 128)
    for name, t in (("a", tok), ("b", tok), ("c", other)):
        t.save_pretrained(tmp_path / name)
    registry = Registry(str(tmp_path / "runs"))
    cfg = compose("reward", ["experiment=ci", "reward.ensemble_size=3",
                             f"reward.ensemble_init=[{tmp_path / 'a'},{tmp_path / 'b'},{tmp_path / 'c'}]"])
    with pytest.raises(PipelineError, match=f"member 2's backbone '{tmp_path / 'c'}' has a tokenizer other than"):
        inputs(cfg, registry)
    cfg.reward.ensemble_init = [str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "a")]
    resolved = inputs(cfg, registry)
    assert [resolved[k].path for k in ("init_from", "member_1", "member_2")] == \
        [str(tmp_path / n) for n in "aba"]
    assert registry.entries() == []


@pytest.mark.slow
def test_members_start_from_the_backbones_ensemble_init_names(ci_fine_tuned, tmp_path):
    """Another pretraining seed on the same tokenizer (tokenizer.path), its SFT, and an ensemble with a member on
    each backbone: the entry's parents are both SFT entries, and each member's backbone is its own."""
    home = copy_registry(ci_fine_tuned, tmp_path)
    registry = Registry(str(home))
    first_pretrain, first_sft = registry.resolve("pretrain:latest").entry, registry.resolve("sft:latest").entry
    run_stages(home, ("pretrain",), f"experiment=ci seed=1 tokenizer.path={first_pretrain.id}")
    second_pretrain = registry.resolve("pretrain:latest").entry
    assert second_pretrain.parents == [first_pretrain.id]
    assert second_pretrain.tokenizer_fingerprint == first_pretrain.tokenizer_fingerprint
    assert second_pretrain.data_fingerprint != first_pretrain.data_fingerprint  # the seed's own corpus
    run_stages(home, ("sft",), f"experiment=ci eval.num_prompts=4 init_from={second_pretrain.id}")
    second_sft = registry.resolve("sft:latest").entry
    run_stages(home, ("reward",), f"experiment=ci reward.ensemble_size=2 "
                                  f"reward.ensemble_init=[{first_sft.id},{second_sft.id}]")
    reward = registry.resolve("reward:latest").entry
    assert reward.parents == [first_sft.id, second_sft.id]
    key = "model.embed_tokens.weight"  # the reward stage trains it little: each member's stays near its start
    starts = [load_file(str(Path(e.path) / "model.safetensors"))[key] for e in (first_sft, second_sft)]
    for i in range(2):
        member = load_file(str(Path(reward.path) / "members" / str(i) / "model.safetensors"))[key]
        distances = [(member - start).norm().item() for start in starts]
        assert distances[i] < distances[1 - i], (i, distances)


def test_the_swap_specialists_split_every_swappable_element_among_the_members():
    cfg = compose("reward", ["ensemble=swap_specialists"])
    elements = [set(cfg.member_data(i).swap_elements) for i in range(cfg.reward.ensemble_size)]
    assert sum(map(len, elements)) == len(set().union(*elements))  # each element is one member's
    assert set().union(*elements) == {e for task in demo.SWAP_ELEMENTS.values() for e in task}
    assert all(cfg.member_data(i).flaw_shares["swap"] > cfg.data.flaw_shares["swap"] for i in range(len(elements)))
    assert cfg.data.swap_elements == []  # the held-out pairs every member is measured on: the stage's own


@pytest.mark.slow
def test_members_train_on_the_data_ensemble_data_gives_each(ci_fine_tuned, tmp_path):
    """Member 0 on the stage's demo pairs, member 1 on a file of the same kind of pairs with chosen and rejected
    swapped: both are evaluated on the stage's held-out pairs, where member 1 learned the wrong way round, and each
    on the held-out pairs of its own data, where each learned its data's way."""
    home = copy_registry(ci_fine_tuned, tmp_path)
    reversed_pairs = tmp_path / "reversed.jsonl"
    reversed_pairs.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]})
                                      + "\n" for r in demo.generate_preferences(400, 7)))
    run_stages(home, ("reward",), f"experiment=ci reward.ensemble_size=2 reward.ensemble_subsample=1.0 "
                                  f"'reward.ensemble_data=[{{}},{{kind:file,path:{reversed_pairs}}}]'")  # braces: quoted
    m = Registry(str(home)).resolve("reward:latest").entry.metrics
    assert m["eval_accuracy/member_0"] > 0.6 > 0.4 > m["eval_accuracy/member_1"], m
    assert m["eval_accuracy/member_0/own"] > 0.6 and m["eval_accuracy/member_1/own"] > 0.6, m
    assert "eval_accuracy/member_0/own/swap" in m  # the demo's pairs name their class; the file's do not
    assert not any(k.startswith("eval_accuracy/member_1/own/") for k in m)


def test_a_member_no_better_than_chance_on_a_class_of_its_own_data_is_named():
    from reward_model.train import own_data_accuracy
    held = [[{"prompt": "p", "chosen": "a", "rejected": "b", "flaw": c} for c in ["easy"] * 40 + ["swap"] * 40]] * 2
    chosen = torch.tensor([[1.0, 1.0]] * 40 + [[1.0, 1.0 if i % 2 else -1.0] for i in range(40)])
    member = lambda i: SimpleNamespace(members=1, normalised=lambda s: s, pair_member_scores=lambda pairs: (
        chosen[:, i:i + 1], torch.zeros(len(chosen), 1)))  # each member scored alone
    metrics, doubts = own_data_accuracy([member(0), member(1)], held)
    assert metrics["eval_accuracy/member_0/own/swap"] == 1.0 and metrics["eval_accuracy/member_1/own/swap"] == 0.5
    assert metrics["eval_accuracy/member_1/own"] == 0.75 and metrics["eval_accuracy/member_1/own/easy"] == 1.0
    assert len(doubts) == 1 and doubts[0].startswith("member 1 scores 0.500") and "40 held-out swap pairs" in doubts[0]


def test_diversity_measures_separate_blind_members_from_agreeing_ones():
    """bench/ensemble_diversity: on the pairs where members split their votes, the vote measure says so, and the
    std of the margins does not (it grows with the margins)."""
    from bench.ensemble_diversity import diversity, swap_ratios
    chosen = torch.tensor([[3.0, 4.0, 2.0], [3.0, 4.4, 1.6], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    rejected = torch.tensor([[-3.0, -3.0, -3.0], [-3.0, -2.6, -3.4], [1.2, 0.8, 1.1], [0.8, 1.1, 0.9]])
    per_class = diversity(chosen, rejected, ["easy", "easy", "swap", "swap"])
    assert per_class["easy"]["against_majority"] == 0.0
    assert per_class["swap"]["against_majority"] == pytest.approx(1 / 3)
    assert per_class["easy"]["member_accuracy"] == [1.0, 1.0, 1.0]
    ratios = swap_ratios(per_class)
    assert ratios["against_majority"] > 100 and ratios["margin_std"] < 1


@pytest.mark.slow
def test_heads_are_one_model_and_centring_pulls_each_pairs_scores_about_zero(ci_fine_tuned, tmp_path):
    """reward.ensemble_kind=heads: one model with an output per head, no member folders. And
    reward.center_rewards_coefficient: every head's scores of a pair's two responses sum to about zero, where the
    same training without the term leaves them wherever the loss let them drift. On the heads' own loss, which reads
    the term from the same trainer arguments as TRL's loss for separate models."""
    pairs = demo.generate_preferences(64, 11)
    level = {}
    for coef in ("null", "10.0"):
        home = copy_registry(ci_fine_tuned, tmp_path / coef)
        run_stages(home, ("reward",), f"experiment=ci trainer.max_steps=20 reward.ensemble_size=2 "
                                      f"reward.ensemble_kind=heads reward.center_rewards_coefficient={coef}")
        entry = Registry(str(home)).resolve("reward:latest").entry
        assert not (Path(entry.path) / "ensemble.json").exists()
        head = load_file(str(Path(entry.path) / "model.safetensors"))["score.weight"]
        assert head.shape[0] == 2 and not torch.equal(head[0], head[1])
        assert entry.metrics["ensemble_size"] == 2 and "eval_accuracy/member_1" in entry.metrics
        chosen, rejected = RewardModel.load("reward:latest", root=str(home)).pair_member_scores(pairs)
        level[coef] = (chosen + rejected).abs().mean().item()
    assert level["10.0"] < 0.25 * level["null"], level
