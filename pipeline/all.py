"""`make all`: the whole pipeline as one run. Every stage runs under one PIPELINE_ID (its entries carry it; it is
their wandb group), each finding its input in the registry; then the run's report.

    python -m pipeline.all --launch "accelerate launch --num_processes 1 -m" -- experiment=ci
    python -m pipeline.all --stages "pretrain sft reward ppo dpo grpo rloo" -- experiment=ci   (make all STAGES=...)
    python -m pipeline.all --benchmarks demo                                                  (make all BENCHMARKS=...)

The overrides after `--` go to every stage that has their key (a pretraining one, such as model=medium or
tokenizer.vocab_size=8192, to pretraining alone). A stage that fails stops the pipeline, named, with its exit status;
the stages before it stay complete in the registry, and each later one can be run on its own (`make sft`, ...):
it finds its input there, and an unfinished run resumes from its last trainer checkpoint.

--benchmarks TASKS evaluates every model of the run (pretrained, SFT, each alignment stage) on the same lm-eval
tasks before the report, whose table then shows what each stage cost on them (pipeline/evaluate.py). An evaluation
that fails leaves the run's entries as they are; the report is written, and the exit status is the evaluation's.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

from pipeline.config import overrides_for

# Each stage a pipeline can run: (make target, module, its own overrides). rloo is make grpo's other algorithm.
STAGES = {"pretrain": ("pretrain", "stages.pretrain", []), "sft": ("sft", "stages.sft", []),
          "reward": ("reward", "reward_model.train", []), "ppo": ("ppo", "stages.ppo", []),
          "dpo": ("dpo", "stages.dpo", []), "grpo": ("grpo", "stages.grpo", []),
          "rloo": ("grpo", "stages.grpo", ["algorithm=rloo"])}
DEFAULT_STAGES = ("pretrain", "sft", "reward", "ppo")


def new_pipeline_id() -> str:
    return time.strftime("pipeline-%Y%m%d-%H%M%S", time.gmtime())


def run_pipeline(launch: list[str], overrides: list[str], env: dict | None = None, runner=subprocess.call,
                 stages: tuple[str, ...] = DEFAULT_STAGES, benchmarks: str | None = None) -> int:
    """Each stage as `launch + [module] + overrides`, in order, under one PIPELINE_ID; then, with benchmarks,
    lm-eval's tasks on each model; then the report. Returns 0, or the exit status of the first step that failed."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"error: unknown stage(s) {unknown}; the stages are {', '.join(STAGES)}", file=sys.stderr)
        return 2
    env = dict(os.environ if env is None else env)
    env["PIPELINE_ID"] = env.get("PIPELINE_ID") or new_pipeline_id()
    print(f"Pipeline run {env['PIPELINE_ID']}", flush=True)
    for i, name in enumerate(stages):
        target, module, own = STAGES[name]
        cmd = [*launch, module, *overrides_for(target, overrides), *own]
        print(shlex.join(cmd), flush=True)
        status = runner(cmd, env=env)
        if status:
            rest = " then ".join(f"make {STAGES[s][0]}" + (f' ARGS="{" ".join(STAGES[s][2])}"' if STAGES[s][2] else "")
                                 for s in stages[i:])
            print(f"error: the pipeline {env['PIPELINE_ID']} stopped at its {name} stage ({module}, exit status "
                  f"{status}); the stages before it are complete in the registry. Fix what the stage's message "
                  f"names, then continue with {rest} (PIPELINE_ID={env['PIPELINE_ID']} keeps them in this run).",
                  file=sys.stderr, flush=True)
            return status
    roots = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("registry.root=")]
    evaluated = 0
    if benchmarks:
        evaluated = runner([sys.executable, "-m", "pipeline.evaluate", "--pipeline", env["PIPELINE_ID"],
                            "--tasks", benchmarks], env={**env, **({"PIPELINE_HOME": roots[-1]} if roots else {})})
        if evaluated:
            print(f"error: the benchmarks ({benchmarks}) stopped with exit status {evaluated}; the run's entries "
                  f"are as the stages left them. Rerun them with python -m pipeline.evaluate --pipeline "
                  f"{env['PIPELINE_ID']} --tasks {benchmarks}", file=sys.stderr, flush=True)
    report = runner([sys.executable, "-m", "pipeline.report", env["PIPELINE_ID"], *(["--root", roots[-1]] if roots else [])],
                    env=env)
    return report or evaluated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.all", description=__doc__.split("\n")[0])
    parser.add_argument("--launch", default=f"{shlex.quote(sys.executable)} -m",
                        help="the command that runs a stage module, up to its name (default: this python -m)")
    parser.add_argument("--stages", default=" ".join(DEFAULT_STAGES),
                        help=f"the stages to run, in order (of: {', '.join(STAGES)}; default: %(default)s)")
    parser.add_argument("--benchmarks", default=None, metavar="TASKS",
                        help="lm-eval tasks to evaluate every model of the run on before the report (demo: the "
                             "demo's own, offline; needs the [eval] extra)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every stage (after --)")
    args = parser.parse_args(argv)
    return run_pipeline(shlex.split(args.launch), args.overrides, stages=tuple(args.stages.split()),
                        benchmarks=args.benchmarks)


if __name__ == "__main__":
    sys.exit(main())
