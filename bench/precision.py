"""A stage's precision by time to quality: the stage in fp32 and in bf16 autocast from the same start, seed by
seed, each run's quality curve and the time at which it first meets its mark (bench/quality.py's MARKS, curves and
clock). What `trainer.mixed_precision=auto` picks for a stage follows what this finds on the machines it names.

    python -m bench.precision reward --seeds 0,1 --init-from sft:latest   # -> $PIPELINE_HOME/precision-reward.json

The runs go one after the other, fp32 then bf16 for each seed, into the bench registry ($PIPELINE_HOME/bench/).
Where the CPU has no native bf16 (AVX2 alone) bf16 is emulated: its quality is what native bf16 computes (products
accumulated in fp32 either way), its time is not.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.quality import CURVE_EVERY, meets, reward_curve, time_at
from bench.run import make_stage

CURVES = {"reward": reward_curve}


def main() -> None:
    from pipeline.registry import Registry, default_root

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=sorted(CURVES))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--init-from", required=True, help="the start both precisions train from (a registry reference "
                                                      "of the user's registry, or a directory)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    a = p.parse_args()
    home = Path(default_root()).resolve()
    root = home / "bench"
    start = Registry(home).resolve(a.init_from).path
    runs = []
    for seed in (int(s) for s in a.seeds.split(",")):
        for precision in ("no", "bf16"):
            args = (f"init_from={start} seed={seed} trainer.mixed_precision={precision} "
                    f"registry.keep_trainer_checkpoints=true trainer.save_steps={CURVE_EVERY} "
                    f"trainer.save_total_limit=1000 {' '.join(a.overrides)}")
            entry = make_stage(a.stage, root, args)
            e = Registry(root).get(entry["id"])
            curve = CURVES[a.stage](e, root / "cache")
            for point in curve:
                point["time_s"] = time_at(e, point["step"])
            hit = next((pt for pt in curve if meets(a.stage, pt)), None)
            runs.append({"seed": seed, "precision": "bf16" if precision == "bf16" else "fp32", "id": e.id,
                         "steady_seconds_per_step": e.metrics["steady_seconds_per_step"],
                         "wall_time_s": e.metrics["wall_time_s"], "curve": curve,
                         "time_to_quality_s": hit["time_s"] if hit else None,
                         "mark_met_at_step": hit["step"] if hit else None})
            print(f"  seed {seed} {runs[-1]['precision']}: " + "; ".join(
                f"step {pt['step']}: " + ", ".join(f"{k} {pt[k]:.3f}" for k in pt if k not in ("step", "time_s"))
                for pt in curve) + f"; {e.metrics['steady_seconds_per_step']:.3f} s a step", flush=True)
    out = home / f"precision-{a.stage}.json"
    out.write_text(json.dumps({"stage": a.stage, "init_from": start, "runs": runs}, indent=2))
    steps = " | ".join(f"step {pt['step']}" for pt in runs[0]["curve"])
    print(f"\n| seed | precision | s a step | {steps} | mark met at | time to quality (s) |")
    for r in runs:
        ttq = "not met" if r["time_to_quality_s"] is None else f"{r['time_to_quality_s']:.0f}"
        values = " | ".join(f"{next(v for k, v in pt.items() if k not in ('step', 'time_s')):.3f}" for pt in r["curve"])
        print(f"| {r['seed']} | {r['precision']} | {r['steady_seconds_per_step']:.3f} | {values} | "
              f"{r['mark_met_at_step']} | {ttq} |")
    print(f"Written: {out}")


if __name__ == "__main__":
    main()
