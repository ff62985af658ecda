"""The benchmark's bookkeeping: which sections run, when a curve meets its mark, the time a stage would have
taken stopped early, and the cost curve's slope and plot. (The speeds themselves are measured, never asserted.)"""
from types import SimpleNamespace

import pytest

from bench.quality import meets, ppo_curve, time_at
from bench.run import sections
from bench.scaling import plot, slope
from tests.conftest import compose


def test_section_switches_are_taken_out_of_the_stage_overrides():
    chosen, rest = sections(["quality=true", "model=tiny", "speed=false", "seed=3"])
    assert chosen == {"speed": False, "quality": True, "scaling": False}
    assert rest == "model=tiny seed=3"
    assert sections([])[0] == {"speed": True, "quality": False, "scaling": False}


def test_a_point_meets_its_mark_only_when_every_figure_does():
    assert meets("pretrain", {"eval_loss": 0.39, "kinds_copied": 4})
    assert not meets("pretrain", {"eval_loss": 0.39, "kinds_copied": 3})
    assert not meets("pretrain", {"eval_loss": 0.45, "kinds_copied": 5})
    assert meets("reward", {"eval_accuracy": 0.95}) and not meets("reward", {"eval_accuracy": 0.90})
    assert not meets("sft", {})


def test_time_to_a_step_takes_the_later_training_out_of_the_wall_time():
    trainer_stage = SimpleNamespace(metrics={"wall_time_s": 500.0, "train_runtime_s": 400.0, "global_step": 400})
    assert time_at(trainer_stage, 400) == pytest.approx(500.0)
    assert time_at(trainer_stage, 100) == pytest.approx(200.0)  # 100 s of start-up and evaluation + 100 steps
    ppo = SimpleNamespace(metrics={"wall_time_s": 300.0, "ppo_steps": 24, "steady_seconds_per_step": 10.0})
    assert time_at(ppo, 8) == pytest.approx(140.0)
    # 48 s of gold checks the bench added inside training: out of the wall time and of the steps' time
    assert time_at(ppo, 24, checks_s=48.0) == pytest.approx(252.0)
    assert time_at(ppo, 8, checks_s=48.0) == pytest.approx(252.0 - 192.0 * 16 / 24)


def test_ppo_gains_are_over_the_sft_responses_its_final_evaluation_scored(tmp_path):
    import json

    (tmp_path / "ppo_history.json").write_text(json.dumps({"gold": [{"step": 8, "gold_score": 0.9, "seconds": 3.0}]}))
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps({"sft_gold": g}) + "\n" for g in (0.5, 0.7, 0.0)))
    entry = SimpleNamespace(path=str(tmp_path), config={"ppo": {"gold_prompts": 2}})  # checks on the first 2
    start, check = ppo_curve(entry)
    assert start == {"step": 0, "gold_score": pytest.approx(0.6), "gold_gain": 0.0}
    assert check["gold_gain"] == pytest.approx(0.3) and check["check_seconds"] == 3.0


def test_the_cost_slope_and_its_plot(tmp_path):
    assert slope([1, 10, 100], [2, 20, 200]) == pytest.approx(1.0)
    assert slope([1, 10, 100], [5, 5 * 10 ** 0.5, 50]) == pytest.approx(0.5)
    points = [{"model": m, "block_size": n, "parameters": p, "flops_per_step": p * n * 96.0,
               "seconds_per_step": p * n * 1e-9, "mfu": 0.1, "peak_rss_mb": 500 + p / 1e4}
              for m, p in (("tiny", 1e5), ("small", 3e6), ("medium", 2.5e7)) for n in (128, 256, 512)]
    plot(points, tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_interval_of_a_ratio_of_sums_over_segment_pairs():
    from bench.pretrain_vs_bare import interval

    assert interval([2.0] * 6, [1.8] * 6) == pytest.approx((0.9, 0.9))  # every pair the same ratio
    low, high = interval([1.0, 1.0, 1.0, 1.0], [0.8, 1.2, 0.9, 1.1])
    assert 0.8 <= low < 1.0 < high <= 1.2


@pytest.mark.slow
def test_the_stage_and_the_bare_loop_run_in_alternating_segments(tmp_path):
    """The real stage (a complete entry) with the bare loop run between its segments: one bare segment per stage
    segment, each stage segment timed from the end of the bare one before it, and the ratio their totals'."""
    from bench.pretrain_vs_bare import measure
    from pipeline.registry import Registry

    out = measure(tmp_path, ["experiment=ci"], segments=3, segment=2, profile_dir=tmp_path / "profile")
    pairs = out["pretrain_vs_bare_segments"]
    assert len(pairs) == 3 and all(p["stage_s"] > 0 and p["bare_s"] > 0 for p in pairs)
    ratio = sum(p["bare_s"] for p in pairs) / sum(p["stage_s"] for p in pairs)
    assert out["pretrain_vs_bare_ratio"] == pytest.approx(ratio)
    assert out["pretrain_vs_bare_ci_low"] <= ratio <= out["pretrain_vs_bare_ci_high"]
    entry = Registry(tmp_path).resolve("pretrain:latest").entry
    # warm-up, the measured pairs, and one more pair under the profiler
    assert entry.id == out["entry"]["id"] and entry.metrics["global_step"] == 5 + (3 + 1) * 2
    for side in ("stage", "bare"):
        assert "aten::mm" in (tmp_path / "profile" / f"{side}.txt").read_text()
    differences = [abs(r["stage_ms"] - r["bare_ms"]) for r in out["pretrain_vs_bare_gap_ms"]]
    assert differences and differences == sorted(differences, reverse=True)  # the largest difference first


@pytest.mark.parametrize("guard,uncertainty,stops", [("min", "min", False), ("stall", "none", True)])
def test_overopt_guards_differ_from_the_unguarded_run_only_in_the_guard(guard, uncertainty, stops):
    from bench.overopt import overrides
    a = SimpleNamespace(guard=guard, coef=1.0, every=8, prompts=200, kl=False, lr_scale=1.0)
    runs = {mode: overrides("grpo", mode, 0, "reward-x", "sft-x", 120, a, ["experiment=ci"])
            for mode in ("unguarded", "guarded")}
    assert "grpo.reward_uncertainty=none" in runs["unguarded"] and "grpo.stall_stop=true" not in runs["unguarded"]
    assert f"grpo.reward_uncertainty={uncertainty}" in runs["guarded"]
    assert ("grpo.stall_stop=true" in runs["guarded"]) == stops
    assert set(runs["guarded"]) ^ set(runs["unguarded"]) <= {"grpo.reward_uncertainty=none",
                                                            f"grpo.reward_uncertainty={uncertainty}",
                                                            "grpo.stall_stop=true"}
    assert "grpo.beta=0.0001" in runs["guarded"]  # no pull toward the start, and its KL still measured
    a.kl, a.lr_scale = True, 4.0  # --kl keeps the stage's penalty; the learning rate is scaled from the stage's
    kept = overrides("ppo", "unguarded", 0, "reward-x", "sft-x", 64, a, ["experiment=ci"])
    assert not any(o.startswith("ppo.kl_coef") for o in kept)
    lr = float(compose("ppo", ["experiment=ci"]).trainer.learning_rate)
    assert f"trainer.learning_rate={lr * 4:g}" in kept


def test_plain_script_trains_its_bf16_stages_on_a_cpu(tmp_path):
    """The parity bench's plain script runs the stages the pipeline runs in bf16 in bf16 (a CPU with AMX tiles
    runs all four so), and transformers accepts that without a GPU; the other stages stay fp32."""
    import torch
    from transformers import TrainingArguments

    from bench.plain_rlhf import precision
    a = SimpleNamespace(bf16=["pretrain"])
    args = TrainingArguments(tmp_path, **precision(a, "pretrain"))
    assert args.bf16 and (args.use_cpu or torch.cuda.is_available())
    assert not TrainingArguments(tmp_path, **precision(a, "sft")).bf16
