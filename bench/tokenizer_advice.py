"""Does the tokenizer warning's advice help? SFT warns when its data is split much more finely than the pretraining
corpus and tells the user to retrain the tokenizer with the fine-tuning text (tokenizer.extra_text=[PATH]). This
measures that advice where the warning fires: a world whose corpus is the demo's stories alone, without the
readers' questions, summaries and sentiment lines around them, so that the fine-tuning language ("Summarize",
"Question", "positive") is rare in pretraining, as a user's instructions are in a user's corpus.

    python -m bench.tokenizer_advice [--seeds 0,1] [--stages pretrain,sft,reward,ppo]   # ~25 min an arm and seed

For each seed it writes the data as local files (bench.parity's sizes and held-out sets, the corpus replaced by
30,000 plain stories) and runs the stages at their defaults on them twice, as a user would (`data=local`):

    plain      the BPE trained on the corpus: SFT warns
    advised    tokenizer.extra_text=[sft.jsonl], as the warning says

Each arm is its own registry, $PIPELINE_HOME/tokenizer_advice/seed<S>/<arm>; a stage complete there is not rerun.
Both arms are judged by bench.parity's judge on the same held-out prompts: the gold differences come with a paired
bootstrap interval. Results go to $PIPELINE_HOME/tokenizer_advice.json.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from bench.parity import SIZES, judge, run_pipeline, write_data

ARMS = ("plain", "advised")
STAGES = ("pretrain", "sft", "reward", "ppo")


def plain_stories(n: int, seed: int) -> list[str]:
    from pipeline import demo

    rng = random.Random(1000 + seed)
    return [demo.render_story(demo.sample_story(rng)) for _ in range(n)]


def stage_args(data: Path, arm: str, stages: tuple[str, ...]) -> dict:
    files = {"pretrain": "corpus", "sft": "sft", "reward": "pairs", "ppo": "prompts"}
    args = {s: f"data=local data.path={data}/{files[s]}.jsonl" for s in stages}
    if arm == "advised":
        args["pretrain"] += f" tokenizer.extra_text=[{data}/sft.jsonl]"
    return args


def arm_figures(registry: Path, data: Path, stages: tuple[str, ...]) -> dict:
    """The judge's figures for an arm, and the tokenizer's coverage its entries recorded."""
    from pipeline.handoff import COVERAGE_WARNING
    from pipeline.registry import Registry

    reg = Registry(registry)
    entries = {s: reg.resolve(f"{s}:latest").entry for s in stages}
    out = judge({s: e.path for s, e in entries.items()}, data)
    pm, sm = entries["pretrain"].metrics, entries["sft"].metrics
    out.update(tokenizer_vocab_size=pm["tokenizer_vocab_size"], corpus_tokens_per_word=pm["corpus_tokens_per_word"],
               sft_tokens_per_word=sm["handoff_tokens_per_word"],
               sft_tokens_per_word_ratio=sm["handoff_tokens_per_word_ratio"],
               warned=sm["handoff_tokens_per_word_ratio"] > COVERAGE_WARNING,
               # per token: not comparable between tokenizers that split the same text differently
               pretrain_eval_loss_per_token=pm["eval_loss"], sft_eval_loss_per_token=sm["eval_loss"],
               **{k: v for k, v in pm.items() if k.startswith("copy_rate/")},
               entries={s: e.id for s, e in entries.items()})
    return out


def compare(row: dict) -> dict:
    """advised − plain for gold after SFT (and PPO), paired over the same held-out prompts."""
    from pipeline.evaluation import paired_bootstrap

    out = {}
    for stage in ("sft", "ppo"):
        key = f"{stage}_gold_per_prompt"
        if key in row["plain"] and key in row["advised"]:
            diff, low, high = paired_bootstrap(row["plain"][key], row["advised"][key])
            out[f"{stage}_gold"] = {"difference": diff, "ci_low": low, "ci_high": high}
    return out


def print_table(results: dict) -> None:
    keys = ("sft_tokens_per_word_ratio", "warned", "copy_rate/person", "copy_rate/obj", "copy_rate/animal",
            "sft_gold", "reward_accuracy", "ppo_gold")
    print(f"\n{'seed':>4} {'figure':26s} {'plain':>9} {'advised':>9}")
    for row in results["seeds"]:
        for k in keys:
            a, b = row["plain"].get(k), row["advised"].get(k)
            if a is not None and b is not None:
                print(f"{row['seed']:>4} {k:26s} {float(a):9.3f} {float(b):9.3f}")
        for what, d in row["advised_minus_plain"].items():
            print(f"{row['seed']:>4} {what + ', advised − plain':26s} {d['difference']:+9.3f}  "
                  f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]")


def main(argv: list[str] | None = None) -> None:
    import os

    from pipeline.registry import default_root

    ap = argparse.ArgumentParser(prog="python -m bench.tokenizer_advice", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    ap.add_argument("--stages", default=",".join(STAGES), help="pretrain,sft at least; reward,ppo for PPO's gold")
    a = ap.parse_args(argv)
    stages = tuple(s for s in STAGES if s in a.stages.split(","))
    home = Path(default_root()).resolve()
    result_file = home / "tokenizer_advice.json"
    results = {"seeds": []}
    for seed in (int(s) for s in a.seeds.split(",")):
        work = home / "tokenizer_advice" / f"seed{seed}"
        data = work / "data"
        if not (data / "heldout_pairs.jsonl").exists():
            write_data(data, seed, corpus=plain_stories(SIZES["corpus"], seed))
        row = {"seed": seed}
        for arm in ARMS:
            print(f"seed {seed}: {arm}", flush=True)
            run_pipeline(stage_args(data, arm, stages), work / arm, seed, os.cpu_count() or 1)
            row[arm] = arm_figures(work / arm, data, stages)
        row["advised_minus_plain"] = compare(row)
        results["seeds"].append(row)
        result_file.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"\nWritten: {result_file}")


if __name__ == "__main__":
    main()
