"""Benchmarks (`make bench`): the pipeline's speed against a bare loop and against the machine's limit.

Figures and ratios measured side by side in one run, printed as a table and written to
$PIPELINE_HOME/bench.json; nothing here asserts a time. The stages run through their real commands on the
demo model, into a registry of their own ($PIPELINE_HOME/bench/), so the user's registry is untouched.

    make bench                      # speed: about 10 minutes on a laptop CPU
    make bench ARGS="quality=true"  # and time to quality: make all with its curves (bench/quality.py)
    make bench ARGS="speed=false scaling=true"   # cost curves alone (bench/scaling.py)
    make bench ARGS="model=tiny"    # extra Hydra overrides, for each stage run that has their keys

Each section's figures replace the same section's in bench.json; the other sections' stay.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 2  # the precision table's stages and SFT's layouts measured alternately, this many times each


def make_stage(stage: str, root: Path, args: str) -> dict:
    """One stage through `make`, into the bench registry; its registry entry."""
    from pipeline.config import overrides_for
    from pipeline.registry import Registry

    args = " ".join(overrides_for(stage, args.split()))  # make bench's ARGS go to the stages that have their keys
    cmd = ["make", "--no-print-directory", stage, f"ARGS=registry.root={root} logging=none {args}"]
    started = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench: make {stage} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    entry = Registry(root).resolve(f"{stage}:latest").entry
    print(f"  make {stage}: {time.time() - started:.0f} s ({entry.id})", flush=True)
    return {"id": entry.id, "path": entry.path, "config": entry.config, "metrics": entry.metrics}


def matmul_peak_flops(dtype: torch.dtype, n: int = 1024, seconds: float = 3.0) -> float:
    """Best matmul rate this machine reaches in dtype with the threads torch uses."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = 0.0
    for _ in range(3):
        torch.mm(a, b)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            torch.mm(a, b)
            count += 1
        best = max(best, 2 * n ** 3 * count / (time.perf_counter() - start))
    return best


def flops_per_token(pretrain: dict) -> float:
    """Training FLOPs per token: 6 x parameters, plus attention (12 x layers x width x context)."""
    cfg = json.loads((Path(pretrain["path"]) / "config.json").read_text())
    block = pretrain["config"]["data"]["block_size"]
    return 6 * pretrain["metrics"]["parameters"] + 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * block


def sft_batching(overrides: list[str], init_from: str, out_dir: Path, steps: int = 20) -> dict:
    """SFT batches as the stage builds them, padded and padding-free (and padded in length-grouped order):
    the share of real (non-padding) tokens, and the training rate in real tokens/s, padded and padding-free
    measured alternately on the same model and rows."""
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_schemas, validate
    from pipeline.data import load_sft_data
    from pipeline.models import load_causal_lm
    from pipeline.run import StageRun
    from stages.sft import build_trainer, padding_free

    register_schemas()
    layouts = {"padded": ["batching=padded"], "padding_free": ["batching=padding_free"],
               "grouped": ["batching=padded", "trainer.group_by_length=true"]}
    trainers, out, rows = {}, {}, None
    for name, layout in layouts.items():
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = validate(compose("sft", overrides=[*overrides, *layout, f"trainer.max_steps={steps}",
                                                     "trainer.warmup_steps=0", f"trainer.save_steps={steps}"]))
        rows = rows or load_sft_data(cfg.data, cfg.seed, out_dir)[0]  # the layout does not change the data
        model, tok = load_causal_lm(init_from, False)
        run = StageRun.standalone("sft", cfg, out_dir / f"sft-{name}")
        trainer = build_trainer(run, model, tok, rows[:1600], rows[:16])
        trainer.args.save_strategy = "no"
        trainer.args.include_num_input_tokens_seen = "non_padding"
        real = total = 0
        for batch in trainer.get_train_dataloader():
            real += int((batch["input_ids"] != tok.pad_token_id).sum())
            total += batch["input_ids"].numel()
        out[f"sft_packing_efficiency_{name}"] = real / total
        if name != "grouped":  # grouped batches are only counted, not timed
            trainers[name] = trainer
    out["sft_default_batching"] = "padding_free" if padding_free("auto", model) else "padded"
    rates: dict = {name: [] for name in trainers}
    for _ in range(ROUNDS):
        for name in rates:
            started = time.perf_counter()
            trainers[name].train()
            rates[name].append(trainers[name].state.num_input_tokens_seen / (time.perf_counter() - started))
    for name, r in rates.items():
        out[f"sft_tokens_per_s_{name}"] = statistics.median(r)
    return out


# fp32 against bf16 autocast, stage by stage: (stage, overrides); each run's steady seconds per step is compared.
# Not PPO: TRL's PPOTrainer trains in fp32 whatever it is told (FP32_STAGES in pipeline/trainer.py).
PRECISION_RUNS = {
    "pretrain 16x256": ("pretrain", "data.num_documents=4000 data.max_eval_blocks=8 trainer.max_steps=20 "
                                    "trainer.save_steps=20"),
    "pretrain 32x128": ("pretrain", "data.num_documents=4000 data.max_eval_blocks=8 trainer.max_steps=20 "
                                    "trainer.save_steps=20 data.block_size=128 trainer.per_device_train_batch_size=32"),
    "reward": ("reward", "trainer.max_steps=20 trainer.save_steps=20 data.max_eval_examples=32"),
}


def precision_table(root: Path, extra: str, peaks: dict) -> dict:
    """Steady seconds per step of each stage in fp32 and in bf16 autocast, run alternately, and what
    trainer.mixed_precision=auto picks here. Where bf16 matmuls run at under half the fp32 rate (no native bf16:
    no AMX, no bf16 GPU), no stage can be faster in bf16 and its bf16 runs are skipped (None)."""
    from pipeline.trainer import resolved_precision

    bf16_viable = peaks["bf16"] >= 0.5 * peaks["fp32"]
    precisions = ("no", "bf16") if bf16_viable else ("no",)
    times: dict = {name: {p: [] for p in precisions} for name in PRECISION_RUNS}
    for _ in range(ROUNDS):
        for name, (stage, args) in PRECISION_RUNS.items():
            for p in precisions:
                entry = make_stage(stage, root, f"{args} trainer.mixed_precision={p} {extra}")
                times[name][p].append(entry["metrics"]["steady_seconds_per_step"])
    table = {}
    for name, t in times.items():
        fp32, bf16 = statistics.median(t["no"]), statistics.median(t["bf16"]) if "bf16" in t else None
        faster = "bf16" if bf16 is not None and bf16 < fp32 else "no"
        auto = resolved_precision("auto", PRECISION_RUNS[name][0])
        table[name] = {"fp32_s_per_step": fp32, "bf16_s_per_step": bf16,
                       "bf16_speedup": fp32 / bf16 if bf16 else peaks["bf16"] / peaks["fp32"],
                       "faster": faster, "auto": auto, "auto_is_faster": auto == faster}
    return table


SECTIONS = {"speed": True, "quality": False, "scaling": False}  # make bench ARGS="quality=true scaling=true"


def sections(argv: list[str]) -> tuple[dict, str]:
    """The sections to run (speed=, quality=, scaling= in ARGS) and the rest of ARGS, for the stages."""
    chosen, rest = dict(SECTIONS), []
    for a in argv:
        key, _, value = a.partition("=")
        if key in SECTIONS and value.lower() in ("true", "false"):
            chosen[key] = value.lower() == "true"
        else:
            rest.append(a)
    return chosen, " ".join(rest)


def main() -> None:
    from pipeline.registry import default_root
    from pipeline.trainer import resolved_precision

    home = Path(default_root()).resolve()
    root = home / "bench"
    chosen, extra = sections(sys.argv[1:])
    torch.set_num_threads(os.cpu_count() or 1)  # as `make` gives a single stage process
    bench_file = home / "bench.json"
    out: dict = json.loads(bench_file.read_text()) if bench_file.exists() else {}  # other sections' figures stay
    if chosen["speed"]:
        out.update(speed(root, extra))
    if chosen["quality"]:
        from bench.quality import table, time_to_quality

        out["time_to_quality"] = time_to_quality(root / "quality", extra)
        print(table(out["time_to_quality"]))
        out.update({k: v for k, v in out["time_to_quality"].items() if k.startswith("time_to_quality_s/")})
    if chosen["scaling"]:
        from bench.scaling import scaling

        dtype = torch.bfloat16 if resolved_precision("auto", "pretrain") == "bf16" else torch.float32
        print("Scaling: the pretraining stage across model sizes and sequence lengths", flush=True)
        out["scaling"] = scaling(make_stage, flops_per_token, root, home, extra, matmul_peak_flops(dtype))
    out["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    bench_file.write_text(json.dumps(out, indent=2))
    print()
    for k, v in out.items():
        if k in ("precision", "time_to_quality", "scaling") or isinstance(v, list):
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items())
        elif isinstance(v, float):
            v = f"{v:.4g}"
        print(f"{k:40s} {v}")
    if chosen["speed"]:
        print_precision(out["precision"], out)
    if chosen["scaling"]:
        print(f"scaling: time per step grows as work^{out['scaling']['time_vs_work_slope']:.2f} over every point; "
              f"plot: {out['scaling']['plot']}")
    print(f"\nWritten: {bench_file}")


def speed(root: Path, extra: str) -> dict:
    """The speed section: the stage against the bare loop, MFU, batching, PPO phases, the precision table."""
    from pipeline.config import overrides_for

    from bench.pretrain_vs_bare import SEGMENT_STEPS, SEGMENTS, gap_table, measure

    print(f"Pretraining stage against a bare loop, interleaved: {SEGMENTS} pairs of {SEGMENT_STEPS}-step segments",
          flush=True)
    out = measure(root, overrides_for("pretrain", extra.split()))
    pretrain = out.pop("entry")
    print(f"  stage {out['pretrain_tokens_per_s']:.0f} tokens/s, bare loop {out['bare_loop_tokens_per_s']:.0f} "
          f"tokens/s: ratio {out['pretrain_vs_bare_ratio']:.3f} [{out['pretrain_vs_bare_ci_low']:.3f}, "
          f"{out['pretrain_vs_bare_ci_high']:.3f}]", flush=True)
    print(gap_table(out["pretrain_vs_bare_gap_ms"]), flush=True)
    print("Peak matmul rate (fp32 and bf16)", flush=True)
    peaks = {"fp32": matmul_peak_flops(torch.float32), "bf16": matmul_peak_flops(torch.bfloat16)}
    out["matmul_peak_flops_fp32"], out["matmul_peak_flops_bf16"] = peaks["fp32"], peaks["bf16"]
    out["matmul_peak_flops"] = peaks["bf16" if out["pretrain_precision"] == "bf16" else "fp32"]
    out["pretrain_model_flops_per_token"] = flops_per_token(pretrain)
    out["pretrain_mfu"] = out["pretrain_tokens_per_s"] * out["pretrain_model_flops_per_token"] \
        / out["matmul_peak_flops"]
    out["bare_loop_mfu"] = out["bare_loop_tokens_per_s"] * out["pretrain_model_flops_per_token"] \
        / out["matmul_peak_flops"]
    out["pretrain_packing_efficiency"] = pretrain["metrics"]["packing_efficiency"]

    print("Fine-tuning and reward model (short runs, the inputs of PPO)", flush=True)
    sft = make_stage("sft", root, f"trainer.max_steps=30 eval.num_prompts=16 {extra}")
    batching = sft_batching(overrides_for("sft", extra.split()), pretrain["path"], root)
    out.update(batching)
    # the stage's default layout (batching=auto) on this machine's attention
    out["sft_packing_efficiency"] = batching[f"sft_packing_efficiency_{batching['sft_default_batching']}"]
    reward = make_stage("reward", root, f"trainer.max_steps=30 {extra}")

    print("PPO: time per phase, and generation against a plain generate", flush=True)
    phases_file = root / "ppo_phases.json"
    r = subprocess.run([sys.executable, "-m", "bench.ppo_phases", str(phases_file), f"registry.root={root}",
                        "logging=none", "trainer.max_steps=4", "eval.num_prompts=16", *overrides_for("ppo", extra.split())],
                       cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench: the PPO run failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    phases = json.loads(phases_file.read_text())
    out.update(phases)

    from pipeline.registry import Registry
    ppo = Registry(root).resolve("ppo:latest").entry

    print("Precision: each stage in fp32 and in bf16 autocast, alternately", flush=True)
    out["precision"] = precision_table(root, extra, peaks)
    out["peak_rss_mb"] = {e["id"].split("-")[0]: e["metrics"]["peak_rss_mb"] for e in (pretrain, sft, reward)}
    out["peak_rss_mb"]["ppo"] = ppo.metrics["peak_rss_mb"]
    return out


def print_precision(table: dict, out: dict) -> None:
    print(f"\n{'stage':18s} {'fp32 s/step':>12s} {'bf16 s/step':>12s} {'bf16 speed-up':>14s}  faster  auto")
    for name, r in table.items():
        bf16 = f"{r['bf16_s_per_step']:12.3f}" if r["bf16_s_per_step"] is not None else f"{'not run':>12s}"
        print(f"{name:18s} {r['fp32_s_per_step']:12.3f} {bf16} {r['bf16_speedup']:13.2f}x  "
              f"{'bf16' if r['faster'] == 'bf16' else 'fp32':6s}  {'bf16' if r['auto'] == 'bf16' else 'fp32'}")
    if any(r["bf16_s_per_step"] is None for r in table.values()):
        print(f"(bf16 not run: bf16 matmuls run at {out['matmul_peak_flops_bf16'] / out['matmul_peak_flops_fp32']:.2f}x the fp32 rate here; the "
              f"speed-up column shows that ratio)")


if __name__ == "__main__":
    main()
