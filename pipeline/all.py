"""`make all`: the whole pipeline as one run. Every stage runs under one PIPELINE_ID (its entries carry it; it is
their wandb group), each finding its input in the registry; then the run's report.

    python -m pipeline.all --launch "accelerate launch --num_processes 1 -m" -- experiment=ci

The overrides after `--` go to every stage that has their key (a pretraining one, such as model=medium or
tokenizer.vocab_size=8192, to pretraining alone). A stage that fails stops the pipeline, named, with its exit status;
the stages before it stay complete in the registry, and each later one can be run on its own (`make sft`, ...):
it finds its input there, and an unfinished run resumes from its last trainer checkpoint.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

from pipeline.config import overrides_for

# (make target, module) of each stage, in order
STAGES = (("pretrain", "stages.pretrain"), ("sft", "stages.sft"), ("reward", "reward_model.train"),
          ("ppo", "stages.ppo"))


def new_pipeline_id() -> str:
    return time.strftime("pipeline-%Y%m%d-%H%M%S", time.gmtime())


def run_pipeline(launch: list[str], overrides: list[str], env: dict | None = None, runner=subprocess.call) -> int:
    """Each stage as `launch + [module] + overrides`, in order, under one PIPELINE_ID; then the report.
    Returns 0, or the exit status of the first stage that failed."""
    env = dict(os.environ if env is None else env)
    env["PIPELINE_ID"] = env.get("PIPELINE_ID") or new_pipeline_id()
    print(f"Pipeline run {env['PIPELINE_ID']}", flush=True)
    for i, (target, module) in enumerate(STAGES):
        cmd = [*launch, module, *overrides_for(target, overrides)]
        print(shlex.join(cmd), flush=True)
        status = runner(cmd, env=env)
        if status:
            rest = " then ".join(f"make {t}" for t, _ in STAGES[i:])
            print(f"error: the pipeline {env['PIPELINE_ID']} stopped at its {target} stage ({module}, exit status "
                  f"{status}); the stages before it are complete in the registry. Fix what the stage's message "
                  f"names, then continue with {rest} (PIPELINE_ID={env['PIPELINE_ID']} keeps them in this run).",
                  file=sys.stderr, flush=True)
            return status
    return runner([sys.executable, "-m", "pipeline.report", env["PIPELINE_ID"]], env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.all", description=__doc__.split("\n")[0])
    parser.add_argument("--launch", default=f"{shlex.quote(sys.executable)} -m",
                        help="the command that runs a stage module, up to its name (default: this python -m)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every stage (after --)")
    args = parser.parse_args(argv)
    return run_pipeline(shlex.split(args.launch), args.overrides)


if __name__ == "__main__":
    sys.exit(main())
