"""Reliability: every stage resumes after kill -9, random kills never corrupt the registry, two stages at
once both complete, a non-finite loss stops cleanly, and nothing unsafe is written or loaded."""
import contextlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoint import last_trainer_checkpoint
from pipeline.config import overrides_for
from pipeline.errors import PipelineError
from pipeline.registry import Registry
from tests.conftest import (complete_entries, compose, copy_registry, kill, kill_after_first_checkpoint, make,
                            registry_entries, run_stages, start)

CI = "experiment=ci"


def assert_registry_consistent(home: Path) -> None:
    """The index and the manifests agree, and no entry is complete without its files."""
    index = {e["id"]: e for e in registry_entries(home)}
    manifests = {p.parent.name: json.loads(p.read_text()) for p in home.glob("checkpoints/*/manifest.json")}
    assert set(manifests) == set(index)
    for entry_id, e in index.items():
        m = manifests[entry_id]
        assert (m["status"], m["parents"], m["config_hash"]) == (e["status"], e["parents"], e["config_hash"])
        if e["status"] == "complete":
            for f in ("model.safetensors", "config.json", "tokenizer.json", "manifest.json"):
                assert (Path(e["path"]) / f).exists(), f"{entry_id} is complete without {f}"


@pytest.fixture(scope="module")
def rewarded(ci_fine_tuned, tmp_path_factory) -> Path:
    home = copy_registry(ci_fine_tuned, tmp_path_factory.mktemp("rewarded"))
    return run_stages(home, ("reward",), "experiment=ci trainer.max_steps=10")


@pytest.fixture
def fine_tuned(ci_fine_tuned):
    return ci_fine_tuned


# Each stage at ci sizes, saving every 4 steps of 12 (GRPO: 10, pretraining: 60); `make` target and its overrides, and make's
# variables (pretrain-ddp: two processes, DDP over gloo, whose data order a resume must keep too)
RESUMED = {
    "pretrain": ("pretrain", "trainer.max_steps=60 trainer.save_steps=4"),  # its steps take milliseconds
    "pretrain-ddp": ("pretrain", "trainer.max_steps=60 trainer.save_steps=4", {"NPROC": 2}),
    "sft": ("sft", "trainer.max_steps=12 trainer.save_steps=4"),
    "reward": ("reward", "trainer.max_steps=12 trainer.save_steps=4"),
    "dpo": ("dpo", "trainer.max_steps=12 trainer.save_steps=4"),
    "grpo": ("grpo", "trainer.save_steps=4"),
    "rloo": ("grpo", "algorithm=rloo trainer.save_steps=4"),
    "ppo": ("ppo", "trainer.max_steps=6 ppo.save_every=2 ppo.gold_every=2 ppo.gold_prompts=8"),
}
TIMINGS = ("wall_time_s", "peak_rss_mb", "steady_seconds_per_step", "train_runtime_s")
# What a resumed Trainer reports of its own run, not of the model: its mean training loss is over the steps it
# ran after the resume (transformers resets the running sum), and so are its tokens per second.
OWN_RUN = ("train_loss", "train_tokens_per_s", "steady_tokens_per_s")


def resume_equivalence(target: str, source: Path, tmp_path: Path, args: str, **make_vars) -> dict:
    """Run `make target ARGS=args` uninterrupted, and again killed with SIGKILL after its first trainer checkpoint
    and rerun, each on its own copy of the registry at `source`. Returns the update or step resumed from, the
    largest absolute difference between the two final models' weights, and each final metric's difference."""
    straight = copy_registry(source, tmp_path / "straight")
    r = make(target, straight, args, **make_vars)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    home = copy_registry(source, tmp_path / "killed")
    kill_after_first_checkpoint(target, home, args, **make_vars)
    # and a later save cut short, as a kill during it leaves one: files in part, trainer_state.json half-written
    saved = Path(last_trainer_checkpoint(next(home.glob("checkpoints/*/trainer"))))
    half = saved.with_name(f"checkpoint-{int(saved.name.split('-')[1]) + 1}")
    shutil.copytree(saved, half)
    (half / "optimizer.pt").unlink()
    (half / "trainer_state.json").write_text((saved / "trainer_state.json").read_text()[:200])
    r = make(target, home, args, **make_vars)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    resumed_from = re.search(r"Resuming \S+ from (?:update (\d+)|\S*checkpoint-(\d+))", r.stdout)
    assert resumed_from, r.stdout[-2000:]
    before = {e["id"] for e in registry_entries(source)}
    [a], [b] = ([e for e in registry_entries(h) if e["id"] not in before and e["status"] == "complete"]
                for h in (straight, home))
    x, y = (load_file(Path(e["path"]) / "model.safetensors") for e in (a, b))
    assert_registry_consistent(home)
    history = f"{a['stage']}_history.json"  # the online methods' gold checks, resumed too (their seconds aside)
    if (Path(a["path"]) / history).exists():
        golds = [[{k: v for k, v in g.items() if k != "seconds"} for g in json.loads(
            (Path(e["path"]) / history).read_text())["gold"]] for e in (a, b)]
        assert golds[0] == golds[1]
    return {"resumed_from": int(resumed_from.group(1) or resumed_from.group(2)),
            "max_abs_weight_difference": max((x[k] - y[k]).abs().max().item() for k in x),
            "metric_differences": {k: b["metrics"][k] - v for k, v in a["metrics"].items()
                                   if isinstance(v, (int, float)) and k not in TIMINGS and k in b["metrics"]}}


# In `make test-all`, PPO (the stage's own resume) and pretraining; the others, whose resume is the Trainer's, with
# the kill tests of `make test-faults`
IN_TEST_ALL = ("ppo", "pretrain")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [s if s in IN_TEST_ALL else pytest.param(s, marks=pytest.mark.faults)
                                   for s in sorted(RESUMED)])
def test_killed_stage_resumes_to_the_uninterrupted_model(rewarded, tmp_path, stage):
    """kill -9 after the first trainer checkpoint, a later one left half-written; the rerun resumes from the whole
    one (data position, optimizer, scheduler, RNG states; PPO's value model and guards too) and ends on the
    uninterrupted run's weights (fp32 on CPU) and final metrics."""
    target, own, *make_vars = RESUMED[stage]
    args = " ".join(overrides_for(target, f"{CI} eval.num_prompts=4 trainer.logging_steps=1 {own}".split()))
    row = resume_equivalence(target, rewarded, tmp_path, args, **(make_vars[0] if make_vars else {}))
    print(f"resume equivalence {stage}: {json.dumps(row)}")
    assert row["resumed_from"] >= (2 if stage == "ppo" else 4)
    assert row["max_abs_weight_difference"] <= 1e-6
    assert {k: d for k, d in row["metric_differences"].items() if d and k not in OWN_RUN} == {}


def test_a_checkpoint_cut_short_is_passed_over(tmp_path):
    """A kill during a save leaves the checkpoint before it as the one to resume from: trainer_state.json is written
    last, so a checkpoint without it whole is not complete; nor is one with another process's RNG state cut short."""
    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_step": 4, "log_hi'), (6, None)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"weights")
        if state:
            (d / "trainer_state.json").write_text(state)
    assert last_trainer_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-2" / "model.safetensors").unlink()
    (tmp_path / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"a LoRA run's adapter")
    assert last_trainer_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    # two processes: the main one wrote trainer_state.json while the other was still writing its RNG state
    d = tmp_path / "checkpoint-8"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"weights")
    (d / "trainer_state.json").write_text('{"global_step": 8}')
    torch.save({"cpu": torch.random.get_rng_state()}, d / "rng_state_0.pth")
    (d / "rng_state_1.pth").write_bytes((d / "rng_state_0.pth").read_bytes()[:100])
    assert last_trainer_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    torch.save({"cpu": torch.random.get_rng_state()}, d / "rng_state_1.pth")
    assert last_trainer_checkpoint(tmp_path) == str(d)


def files_of(home: Path, ids) -> dict:
    """Each file of these entries' directories, with its size and modification time."""
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for i in ids
            for f in (home / "checkpoints" / i).rglob("*") if f.is_file()}


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.parametrize("stage", sorted(s for s in RESUMED if s != "pretrain-ddp"))
def test_kills_at_random_points_lose_nothing(rewarded, tmp_path, stage):
    """SIGKILL at random times over a run's whole life (setup, training, checkpoint saves, the registry update,
    the evaluation after the model is saved), ten times, rerunning the same command after each: the registry
    never holds an entry complete without a loadable model, one attempt never completes two entries, no other
    entry's files are touched, and a last rerun completes."""
    target, own, *_ = RESUMED[stage]
    args = " ".join(overrides_for(target, f"{CI} eval.num_prompts=4 trainer.logging_steps=1 {own}".split()))
    home = copy_registry(rewarded, tmp_path / "runs")
    others = [e["id"] for e in registry_entries(home)]
    untouched = files_of(home, others)
    started = time.time()
    r = make(target, copy_registry(rewarded, tmp_path / "timed"), args)  # how long a whole run takes
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    whole = time.time() - started
    rng = random.Random(stage)
    for _ in range(10):
        done = len(complete_entries(home, stage))
        p = start(target, home, args)
        time.sleep(rng.uniform(0.5, 1.1 * whole))
        kill(p)
        assert_registry_consistent(home)
        complete = complete_entries(home, stage)
        assert len(complete) <= done + 1, "one attempt completed two entries"
        for e in complete:
            assert load_file(Path(e["path"]) / "model.safetensors")  # whole, not cut short
        assert files_of(home, others) == untouched
    r = make(target, home, args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert complete_entries(home, stage) and files_of(home, others) == untouched
    assert_registry_consistent(home)


@pytest.mark.slow
def test_two_stages_at_once_both_complete(fine_tuned, tmp_path):
    """Two stages from two shells write one registry at once: neither loses its entry, and `stage:latest` resolves
    to a complete entry throughout."""
    home = copy_registry(fine_tuned, tmp_path)
    runs = [start("pretrain", home, CI), start("sft", home, f"{CI} eval.num_prompts=4")]
    reg = Registry(home)
    while any(p.poll() is None for p in runs):
        for stage in ("pretrain", "sft"):
            assert reg.resolve(f"{stage}:latest").entry.status == "complete"
        time.sleep(0.2)
    outs = [p.communicate(timeout=600)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outs[0][-1500:] + outs[1][-1500:]
    for stage in ("pretrain", "sft"):
        old, new = complete_entries(home, stage)
        assert reg.resolve(f"{stage}:latest").entry.id == new["id"] != old["id"]
    assert_registry_consistent(home)


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(home):
    args = (f"{CI} trainer.learning_rate=1e6 trainer.warmup_steps=100 trainer.lr_scheduler_type=linear "
            "trainer.max_grad_norm=0 trainer.save_steps=1 trainer.logging_steps=1")
    r = make("pretrain", home, args)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out, out[-2000:]
    assert "became non-finite at step" in out or "the training loss became nan at step" in out, out[-2000:]
    [e] = registry_entries(home)
    assert e["status"] == "failed" and "at step" in e["note"]
    kept = sorted(Path(e["path"], "trainer").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert kept, "no trainer checkpoint kept"
    assert f"The last good trainer checkpoint is kept: {kept[-1]}" in out
    for ckpt in kept:  # every checkpoint on disk is a good one
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values()), ckpt


SECRET = "sEcReT-c4n4ry-7f2e"


@pytest.mark.slow
def test_no_secret_lands_in_any_file_a_run_writes(home):
    env = {"WANDB_API_KEY": "local-" + SECRET, "HF_TOKEN": "hf_" + SECRET, "MY_SERVICE_TOKEN": SECRET,
           "OTHER_API_KEY": SECRET}
    os.environ.update(env)  # make() passes the environment on
    try:
        r = make("pretrain", home, f"{CI} logging=wandb")
    finally:
        for k in env:
            os.environ.pop(k)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert SECRET not in r.stdout + r.stderr
    hits = [str(f) for f in home.rglob("*") if f.is_file() and SECRET.encode() in f.read_bytes()]
    assert not hits, hits
    assert list(home.glob("wandb/offline-run-*"))  # wandb wrote its files, and none holds the secret


@pytest.mark.slow
def test_checkpoints_are_safetensors_and_remote_code_is_off(fine_tuned, tmp_path):
    for e in registry_entries(fine_tuned):
        files = os.listdir(e["path"])
        assert "model.safetensors" in files
        assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))], files
        assert (e["config"]["model"] if e["stage"] == "pretrain" else e["config"])["trust_remote_code"] is False
    # a model directory that asks for custom code is refused unless the config turns it on
    [sft] = complete_entries(fine_tuned, "sft")
    custom = tmp_path / "custom"
    custom.mkdir()
    for f in os.listdir(sft["path"]):
        if f.endswith((".json", ".safetensors", ".jinja")) and f != "manifest.json":
            (custom / f).write_bytes((Path(sft["path"]) / f).read_bytes())
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.Evil"}
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    home = copy_registry(fine_tuned, tmp_path)
    r = make("reward", home, f"{CI} init_from={custom} trainer.max_steps=2")
    assert "custom code ran" not in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr


@pytest.mark.slow
def test_an_error_after_the_save_keeps_the_model(fine_tuned, tmp_path, monkeypatch, caplog):
    """An exception in the post-save evaluation: the entry completes with the training metrics, the failure is in
    its note and printed, and the model resolves by reference (the stage runs in this process)."""
    from transformers import AutoModelForCausalLM

    import stages.sft
    from pipeline.registry import Registry

    home = copy_registry(fine_tuned, tmp_path)
    cfg = compose("sft", [CI, f"registry.root={home}", "eval.num_prompts=4", "trainer.max_steps=5"], typed=False)
    calls = []

    def judge_fails_after_training(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("the judge broke")

    monkeypatch.setattr(stages.sft, "evaluate_against_start", judge_fails_after_training)
    stages.sft.run_stage("sft", cfg, stages.sft.sft, stages.sft.inputs)
    assert len(calls) == 1
    resolved = Registry(home).resolve("sft:latest")
    entry = resolved.entry
    assert entry.status == "complete" and "the judge broke" in entry.note and "model was saved" in entry.note
    assert entry.metrics["global_step"] == 5 and "eval_loss" in entry.metrics and "gold_score" not in entry.metrics
    assert any(r.levelname == "WARNING" and "the judge broke" in r.getMessage() for r in caplog.records)
    AutoModelForCausalLM.from_pretrained(resolved.path)  # the trained model, reachable by reference
