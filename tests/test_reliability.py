"""Reliability: every stage resumes after kill -9, random kills never corrupt the registry, two stages at
once both complete, a non-finite loss stops cleanly, and nothing unsafe is written or loaded."""
import contextlib
import json
import os
import random
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
LONG = "trainer.max_steps=80 trainer.save_steps=10 trainer.logging_steps=1000"


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


@pytest.fixture
def fine_tuned(ci_fine_tuned):
    return ci_fine_tuned


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward"])
def test_killed_stage_resumes_to_the_uninterrupted_result(fine_tuned, tmp_path, stage):
    """kill -9 after the first trainer checkpoint; the rerun resumes (data position, optimizer, scheduler,
    RNG) and ends where an uninterrupted run ends."""
    args = " ".join(overrides_for(stage, f"{CI} eval.num_prompts=4 {LONG}".split()))
    straight = copy_registry(fine_tuned, tmp_path / "straight")
    r = make(stage, straight, args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    reference = complete_entries(straight, stage)[-1]  # the newest (the fixture holds an sft entry too)

    home = copy_registry(fine_tuned, tmp_path / "killed")
    kill_after_first_checkpoint(stage, home, args)
    [killed] = [e for e in registry_entries(home, stage) if e["status"] != "complete"]
    assert killed["status"] == "running"
    with contextlib.suppress(PipelineError):  # an unfinished run is never input: latest is another entry, or none
        assert Registry(home).resolve(f"{stage}:latest").entry.id != killed["id"]
    r = make(stage, home, args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"Resuming {killed['id']} from" in r.stdout
    resumed = complete_entries(home, stage)[-1]
    assert resumed["id"] == killed["id"] and resumed["metrics"]["global_step"] == 80
    assert Registry(home).resolve(f"{stage}:latest").entry.id == killed["id"]
    assert resumed["metrics"]["eval_loss"] == pytest.approx(reference["metrics"]["eval_loss"], rel=0.01)
    assert_registry_consistent(home)


@pytest.fixture(scope="module")
def rewarded(ci_fine_tuned, tmp_path_factory) -> Path:
    home = copy_registry(ci_fine_tuned, tmp_path_factory.mktemp("rewarded"))
    return run_stages(home, ("reward",), "experiment=ci trainer.max_steps=10")


PPO_RESUME = "experiment=ci eval.num_prompts=8 ppo.gold_every=2 ppo.gold_prompts=8 trainer.max_steps=6 ppo.save_every=2"
TIMINGS = ("wall_time_s", "peak_rss_mb", "steady_seconds_per_step")


@pytest.mark.slow
def test_killed_ppo_resumes_to_the_same_policy(rewarded, tmp_path):
    """kill -9 after PPO's first save (update 2), with the next save left as a kill during it leaves one (its
    files in part, trainer_state.json cut short): the rerun resumes from update 2 (weights, value model, optimizer,
    scheduler, RNG states, the prompts' position, the gold history) and ends on the uninterrupted run's policy and
    metrics exactly (fp32 on CPU)."""
    straight = copy_registry(rewarded, tmp_path / "straight")
    r = make("ppo", straight, PPO_RESUME)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    [reference] = complete_entries(straight, "ppo")

    home = copy_registry(rewarded, tmp_path / "killed")
    kill_after_first_checkpoint("ppo", home, PPO_RESUME)
    [killed] = [e for e in registry_entries(home, "ppo")]
    saved = Path(killed["path"]) / "trainer" / "checkpoint-2"
    half = saved.parent / "checkpoint-4"
    shutil.copytree(saved, half, dirs_exist_ok=True)
    (half / "optimizer.pt").unlink()
    (half / "trainer_state.json").write_text((saved / "trainer_state.json").read_text()[:200])
    r = make("ppo", home, PPO_RESUME)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"Resuming {killed['id']} from update 2 of 6" in r.stdout
    [resumed] = complete_entries(home, "ppo")
    a, b = (load_file(Path(e["path"]) / "model.safetensors") for e in (reference, resumed))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert {k: v for k, v in resumed["metrics"].items() if k not in TIMINGS} == \
        {k: v for k, v in reference["metrics"].items() if k not in TIMINGS}
    history = [json.loads((Path(e["path"]) / "ppo_history.json").read_text()) for e in (reference, resumed)]
    assert [h["step"] for h in history[1]["log"]] == [1, 2, 3, 4, 5, 6]
    assert [g["step"] for g in history[1]["gold"]] == [2, 4, 6]
    assert [g["gold_score"] for g in history[1]["gold"]] == [g["gold_score"] for g in history[0]["gold"]]
    assert not (Path(resumed["path"]) / "trainer").exists()
    assert_registry_consistent(home)


def test_a_checkpoint_cut_short_is_passed_over(tmp_path):
    """A kill during a save leaves the checkpoint before it as the one to resume from: trainer_state.json is written
    last, so a checkpoint without it whole is not complete."""
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


@pytest.mark.slow
@pytest.mark.faults
def test_random_kills_never_corrupt_the_registry(home):
    """Fault injection: kill -9 at random points (before, during and after setup and checkpoints); after
    each, the registry is consistent; the rerun completes. `make test-faults` runs it."""
    # each attempt trains for at most ~10 s (about 400 steps) of its life, so no attempt finishes
    args = f"{CI} trainer.max_steps=2000 trainer.save_steps=25 trainer.logging_steps=1000"
    rng = random.Random(0)
    for _ in range(4):
        p = start("pretrain", home, args)
        time.sleep(rng.uniform(2, 16))
        kill(p)
        assert_registry_consistent(home)
        assert not complete_entries(home, "pretrain")
    r = make("pretrain", home, args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert_registry_consistent(home)
    [done] = complete_entries(home, "pretrain")
    assert done["metrics"]["global_step"] == 2000
    assert all(e["status"] in ("failed", "running") for e in registry_entries(home) if e["id"] != done["id"])


@pytest.mark.slow
def test_two_stages_at_once_both_complete(home):
    runs = [start("pretrain", home, CI) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outs[0][-1500:] + outs[1][-1500:]
    entries = complete_entries(home, "pretrain")
    assert len(entries) == 2 and entries[0]["id"] != entries[1]["id"]
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
