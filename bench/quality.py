"""Time to quality (`make bench ARGS="quality=true"`): the demo pipeline as `make all` runs it, each stage's
quality along its own training curve, and the wall time at which the stage first reaches its quality mark.

The stages run with their defaults into the bench registry, keeping a trainer checkpoint every CURVE_EVERY steps;
each kept checkpoint is evaluated afterwards, off the stage's clock, as the stage evaluates its final model
(pretraining: eval loss and copy rate; SFT: gold on the held-out prompts; reward: held-out accuracy). PPO keeps no
trainer checkpoints: its curve is the gold check it runs every `ppo.gold_every` updates (responses sampled as
its final evaluation samples them, here on all its held-out prompts), against the SFT model's on the same
prompts with the same noise; the seconds of those checks are left out of its times.

A stage's time to quality is its wall time had its training stopped at the first point of its curve that meets
its mark: the whole process (start-up, data, the evaluations it runs) with the training steps after that point
taken out.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

# The quality marks: what the demo's defaults reach (README, "The whole pipeline", and Pretraining's table), less
# about the spread between seeds. A point meets its stage's mark when every figure named meets it. The reward
# model's: every class of flaw but swap is learned (1.00) and swap stays near chance (0.46-0.59 of its ~54 of
# the 400 pairs in each of six runs), so accuracy is 0.865 plus a coin-flip share, spread by about 0.01 from that
# alone.
MARKS = {
    "pretrain": {"eval_loss": ("<=", 0.40), "kinds_copied": (">=", 4)},
    "sft": {"gold_score": (">=", 0.68)},
    "reward": {"eval_accuracy": (">=", 0.92)},
    "ppo": {"gold_gain": (">=", 0.08)},
}
CURVE_EVERY = 50  # trainer checkpoints kept this many steps apart, each evaluated after the stage
PPO_CURVE_PROMPTS = 200  # PPO's gold checks on all of its held-out prompts (the stage's default checks 48)


def meets(stage: str, point: dict) -> bool:
    return all(point.get(k) is not None and (point[k] <= v if op == "<=" else point[k] >= v)
               for k, (op, v) in MARKS[stage].items())


def checkpoints(entry) -> list[tuple[int, Path]]:
    """The kept trainer checkpoints of a complete entry, by step."""
    found = [(int(p.name.rsplit("-", 1)[1]), p) for p in (Path(entry.path) / "trainer").glob("checkpoint-*")
             if p.name.rsplit("-", 1)[1].isdigit()]
    return sorted(found)


def pretrain_curve(entry, cache_dir: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    from pipeline.config import CorpusData
    from pipeline.data import load_corpus, pack_into_blocks
    from pipeline.evaluation import copy_rate

    cfg = entry.config
    tok = AutoTokenizer.from_pretrained(entry.path)
    _, eval_docs = load_corpus(CorpusData(**cfg["data"]), cfg["seed"], cache_dir)
    blocks = pack_into_blocks(eval_docs, tok, cfg["data"]["block_size"], "eval corpus")
    blocks = blocks.select(range(min(len(blocks), cfg["data"]["max_eval_blocks"])))
    args = TrainingArguments(output_dir=str(cache_dir / "curve-eval"), report_to="none", use_cpu=True,
                             per_device_eval_batch_size=cfg["trainer"]["per_device_eval_batch_size"])
    curve = []
    for step, path in checkpoints(entry):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        loss = Trainer(model=model, args=args, eval_dataset=blocks, data_collator=default_data_collator) \
            .evaluate()["eval_loss"]
        rates = copy_rate(model, tok, eval_docs)
        curve.append({"step": step, "eval_loss": loss, "kinds_copied": sum(r > 0.5 for r in rates.values()),
                      **{f"copy_rate/{k}": v for k, v in rates.items()}})
    return curve


def sft_curve(entry) -> list[dict]:
    from pipeline import demo
    from pipeline.config import GenerationEvalConfig
    from pipeline.evaluation import gold_eval
    from pipeline.models import load_causal_lm

    cfg = entry.config
    prompts = demo.generate_prompts(cfg["eval"]["num_prompts"], cfg["seed"] + 1, heldout=True)
    gen = GenerationEvalConfig(**cfg["eval"])
    curve = []
    for step, path in checkpoints(entry):
        model, tok = load_causal_lm(str(path), False)
        curve.append({"step": step, "gold_score": gold_eval(model, tok, prompts, gen, f"SFT step {step}")[0]})
    return curve


def reward_curve(entry, cache_dir: Path) -> list[dict]:
    from pipeline.config import PairData
    from pipeline.data import load_preference_data
    from pipeline.models import load_reward_model
    from reward_model.scoring import RewardModel

    cfg = entry.config
    _, pairs = load_preference_data(PairData(**cfg["data"]), cfg["seed"], cache_dir)
    for p in pairs:
        p.pop("flaw", None)
    return [{"step": step, "eval_accuracy": RewardModel(*load_reward_model(str(path), False)).pair_accuracy(pairs)[0]}
            for step, path in checkpoints(entry)]


def ppo_curve(entry) -> list[dict]:
    """The PPO run's own gold checks (responses sampled as its final evaluation samples them, on its first
    ppo.gold_prompts held-out prompts), as gains over the SFT model's responses to the same prompts with the same
    noise: those its final evaluation scored (samples.jsonl, `sft_gold`)."""
    import json

    history = json.loads((Path(entry.path) / "ppo_history.json").read_text())["gold"]
    with open(Path(entry.path) / "samples.jsonl") as f:
        sft_gold = [json.loads(line)["sft_gold"] for line in f][:entry.config["ppo"]["gold_prompts"]]
    start = sum(sft_gold) / len(sft_gold)
    return [{"step": 0, "gold_score": start, "gold_gain": 0.0}] + [
        {"step": h["step"], "gold_score": h["gold_score"], "gold_gain": h["gold_score"] - start,
         "check_seconds": h.get("seconds", 0.0)} for h in history]


def time_at(entry, step: int, checks_s: float = 0.0) -> float:
    """The stage's wall time with the training after `step` taken out, and the seconds of in-training checks
    the bench added (`checks_s`) left out."""
    m = entry.metrics
    steps = m.get("global_step") or m["ppo_steps"]
    training = (m.get("train_runtime_s") or steps * m["steady_seconds_per_step"]) - checks_s
    return m["wall_time_s"] - checks_s - training * (1 - step / steps)


def time_to_quality(root: Path, extra: str) -> dict:
    """`make all` with the defaults (and extra), each stage's curve, and its time to quality."""
    from pipeline.registry import Registry

    cmd = ["make", "--no-print-directory", "all",
           f"ARGS=registry.root={root} logging=none registry.keep_trainer_checkpoints=true "
           f"trainer.save_steps={CURVE_EVERY} trainer.save_total_limit=1000 ppo.gold_prompts={PPO_CURVE_PROMPTS} "
           f"{extra}"]
    print(f"Time to quality: {' '.join(cmd)}", flush=True)
    started = time.time()
    r = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
    total = time.time() - started
    if r.returncode != 0:
        sys.exit(f"bench: make all failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    reg = Registry(root)
    entries = {s: reg.resolve(f"{s}:latest").entry for s in MARKS}
    cache = root / "cache"
    curves = {"pretrain": pretrain_curve(entries["pretrain"], cache), "sft": sft_curve(entries["sft"]),
              "reward": reward_curve(entries["reward"], cache),
              "ppo": ppo_curve(entries["ppo"])}
    out = {"make_all_s": total, "marks": {s: {k: f"{op} {v}" for k, (op, v) in m.items()} for s, m in MARKS.items()}}
    for stage, curve in curves.items():
        e = entries[stage]
        checks = sum(p.get("check_seconds", 0.0) for p in curve)
        for point in curve:
            point["time_s"] = time_at(e, point["step"], checks)
        hit = next((p for p in curve if meets(stage, p)), None)
        out[f"time_to_quality_s/{stage}"] = hit["time_s"] if hit else None
        out[f"stage_wall_s/{stage}"] = e.metrics["wall_time_s"]
        out[f"curve/{stage}"] = curve
        print(f"  {stage}: " + "; ".join(
            f"step {p['step']} ({p['time_s']:.0f} s): " + ", ".join(f"{k} {p[k]:.3g}" for k in MARKS[stage])
            for p in curve), flush=True)
    reached = [out[f"time_to_quality_s/{s}"] for s in MARKS]
    out["time_to_quality_s/sum"] = sum(reached) if all(t is not None for t in reached) else None
    return out


def table(out: dict) -> str:
    """The time-to-quality table as markdown."""
    rows = ["| stage | mark | stage wall time (s) | time to quality (s) |", "|---|---|---|---|"]
    for s in MARKS:
        t = out[f"time_to_quality_s/{s}"]
        mark = ", ".join(f"{k} {m}" for k, m in out["marks"][s].items())
        rows.append(f"| {s} | {mark} | {out[f'stage_wall_s/{s}']:.0f} | {'not reached' if t is None else f'{t:.0f}'} |")
    total = out["time_to_quality_s/sum"]
    rows.append(f"| make all | | {out['make_all_s']:.0f} | {'—' if total is None else f'{total:.0f} (sum)'} |")
    return "\n".join(rows)
