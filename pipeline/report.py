"""The report of one pipeline run: a summary table, each stage's curves as PNGs, one Markdown page.

    python -m pipeline.report                  # the newest pipeline run in the registry
    python -m pipeline.report PIPELINE_ID      # a given one (make report PIPELINE_ID=...)

A pipeline run is what `make all` starts under one PIPELINE_ID: its entries carry that id. The report goes
to <registry root>/pipelines/<PIPELINE_ID>/: report.md, loss_<stage>.png, <stage>_curves.png for the online
alignment stages, gold_by_method.png and the comparison table when the run tuned its SFT model with more than
one alignment method, benchmarks.png and the benchmark table when its models were evaluated (pipeline.evaluate),
summary.txt.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from pipeline.compare import write_comparison
from pipeline.errors import PipelineError
from pipeline.evaluate import benchmark_table, plot_benchmarks
from pipeline.evaluation import MIN_EVAL_PROMPTS, with_interval
from pipeline.registry import ALIGNMENT_STAGES, Entry, Registry
from pipeline.checkpoint import LOG_HISTORY

# What the summary shows of each stage, in order.
SUMMARY_METRICS = {
    "pretrain": ("initial_eval_loss", "eval_loss", "perplexity"),
    "sft": ("eval_loss", "baseline_gold_score", "gold_score", "gold_gain"),
    "reward": ("eval_accuracy", "eval_margin", "score_std", "ensemble_size", "eval_disagreement"),
    **{stage: ("baseline_reward_mean", "reward_mean", "reward_gain", "baseline_gold_score", "gold_score", "gold_gain",
               "eval_prompts", "kl", "baseline_ensemble_std", "ensemble_std", "disagreement_warning_step",
               "stall_warning_step", "stall_stop_step")
       for stage in ("ppo", "grpo", "rloo")},
    "dpo": ("implicit_reward_accuracy", "baseline_gold_score", "gold_score", "gold_gain", "eval_prompts", "kl"),
}
# What the online alignment stages log, per update: (reward, KL to the start).
CURVES = {"ppo": ("objective/scores", "objective/kl"), "grpo": ("reward", "kl"), "rloo": ("reward", "kl")}


def pipeline_dir(registry: Registry, pipeline_id: str) -> Path:
    return registry.root / "pipelines" / pipeline_id


def latest_pipeline_id(registry: Registry) -> str:
    ids = [e.pipeline_id for e in registry.entries() if e.pipeline_id]
    if not ids:
        raise PipelineError(f"no pipeline runs in {registry.root}: `make all` starts one")
    return ids[-1]


def wall_time_s(e: Entry) -> float | None:
    """The stage's process from start to completion (the entry's own times for older entries)."""
    if "wall_time_s" in e.metrics or not e.finished_at:
        return e.metrics.get("wall_time_s")
    return (datetime.fromisoformat(e.finished_at) - datetime.fromisoformat(e.created_at)).total_seconds()


def summary_table(entries: list[Entry]) -> str:
    rows = [("stage", "entry", "status", "wall time", "key metrics")]
    for e in entries:
        wall = wall_time_s(e)
        shown = ", ".join(f"{k}={with_interval(e.metrics, k)}" for k in SUMMARY_METRICS[e.stage] if k in e.metrics)
        rows.append((e.stage, e.id, e.status, f"{wall:.0f} s" if wall is not None else "-", shown))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def plot_training(e: Entry, out: Path) -> Path | None:
    """Training loss against step (and, for a reward model, pair accuracy) from the saved log history."""
    import matplotlib.pyplot as plt

    log = [h for h in read_json(Path(e.path) / LOG_HISTORY) or [] if "loss" in h and "step" in h]
    if not log:
        return None
    panels = [("loss", "training loss")] + ([("accuracy", "pair accuracy (train batches)")]
                                             if e.stage == "reward" else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        points = [(h["step"], float(h[key])) for h in log if key in h]
        ax.plot(*zip(*points), marker=".")
        ax.set(xlabel="step", ylabel=label, title=f"{e.stage}: {label}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / f"loss_{e.stage}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def policy_panels(stage: str, log: list[dict]) -> list[tuple[list[str], str]]:
    """The curves of an online method's log history, a panel each: (logged keys, label), those it logged."""
    reward_key, kl_key = CURVES[stage]
    members = sorted({k for h in log for k in h if k.startswith("reward/member_")},
                     key=lambda k: int(k.rsplit("_", 1)[1]))
    panels = [([reward_key], "reward" + (" (normalized)" if stage == "ppo" else "")),
              ([kl_key], "KL to the SFT policy"), (["reward/ensemble_std"], "reward ensemble's disagreement"),
              (members, "each reward member's score")]
    return [(keys, label) for keys, label in panels if any(k in h for k in keys for h in log)]


def plot_policy(e: Entry, out: Path) -> Path | None:
    """Reward, KL to the reference, a reward ensemble's disagreement and each member's score (a member that parts
    ways with the others is one that sees what they do not), and on the demo the gold score, over the updates of
    PPO, GRPO or RLOO."""
    import matplotlib.pyplot as plt

    reward_key = CURVES[e.stage][0]
    history = read_json(Path(e.path) / f"{e.stage}_history.json") or {}
    log = [h for h in history.get("log", []) if reward_key in h]
    if not log:
        return None
    gold = history.get("gold", [])
    panels = policy_panels(e.stage, log)
    fig, axes = plt.subplots(1, len(panels) + bool(gold), figsize=(5 * (len(panels) + bool(gold)), 3.6),
                             squeeze=False)
    name = e.stage.upper()
    for ax, (keys, label) in zip(axes[0], panels):
        for key in keys:
            ax.plot([h["step"] for h in log if key in h], [h[key] for h in log if key in h], marker=".",
                    label=key.removeprefix("reward/").replace("_", " "))
        ax.set(xlabel=f"{name} update", ylabel=label, title=label)
        if len(keys) > 1:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if gold:
        ax = axes[0][-1]
        ax.plot([g["step"] for g in gold], [g["gold_score"] for g in gold], marker="o", color="tab:green")
        ax.set(xlabel=f"{name} update", ylabel="gold score", title="gold score (held-out prompts, never trained on)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / ("ppo.png" if e.stage == "ppo" else f"{e.stage}_curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def flaw_table(entries: list[Entry]) -> str | None:
    """The demo's flaw classes: the reward model's held-out accuracy on each, and the rate of each in the
    sampled held-out responses of the pretrained model, the SFT model and the PPO policy (Markdown)."""
    latest = {e.stage: e for e in entries}
    sft, reward, ppo = latest.get("sft"), latest.get("reward"), latest.get("ppo")
    sources = [(name, e, key) for name, e, key in (
        ("pretrained", sft, "baseline_flaw_rate"), ("SFT", sft, "flaw_rate"),
        ("SFT (PPO's sampling)", ppo, "baseline_flaw_rate"), ("PPO", ppo, "flaw_rate")) if e is not None]
    classes = sorted({k.split("/", 1)[1] for _, e, key in sources for k in e.metrics if k.startswith(key + "/")})
    if not classes:
        return None
    cols = [name for name, e, key in sources if f"{key}/{classes[0]}" in e.metrics]
    ensemble = reward is not None and any(k.startswith("eval_disagreement/") for k in reward.metrics)
    head = (["flaw class"] + (["reward accuracy"] if reward else []) + (["reward disagreement"] if ensemble else [])
            + [f"rate: {c}" for c in cols])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cell = lambda v: "–" if v is None else f"{v:.3f}"
    for c in classes:
        row = [c] + ([cell(reward.metrics.get(f"eval_accuracy/{c}"))] if reward else [])
        row += [cell(reward.metrics.get(f"eval_disagreement/{c}"))] if ensemble else []
        row += [cell(e.metrics.get(f"{key}/{c}")) for name, e, key in sources if name in cols]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(registry: Registry, pipeline_id: str) -> Path:
    """Write the report of a pipeline run; return the path of its Markdown page."""
    import matplotlib
    matplotlib.use("Agg")

    entries = registry.pipeline_entries(pipeline_id)
    out = pipeline_dir(registry, pipeline_id)
    out.mkdir(parents=True, exist_ok=True)
    table = summary_table(entries)
    (out / "summary.txt").write_text(table + "\n")

    lines = [f"# Pipeline run {pipeline_id}", "", f"Registry: `{registry.root}`", "", "```", table, "```", ""]
    flaws = flaw_table(entries)
    if flaws:
        lines += ["## The demo's flaw classes", "", "Reward-model accuracy on held-out pairs whose rejected response "
                  "has the class (with an ensemble, its members' disagreement on them: the std of their normalised "
                  "scores), and the share of sampled held-out responses that show it (the demo's detectors).",
                  "", flaws, ""]
    benchmarks = benchmark_table(entries)
    if benchmarks:
        lines += ["## Benchmarks: what each stage kept of what the model knew", "",
                  "lm-eval's tasks on every model of the run (`python -m pipeline.evaluate --pipeline "
                  f"{pipeline_id}`, or `make all BENCHMARKS=...`): value ± stderr, and each later stage's change "
                  "against the first item by item, with its 95% paired bootstrap interval. A fall where higher is "
                  "better (accuracy), or a rise in bits per byte, is the alignment tax.", "", benchmarks, ""]
        plot = plot_benchmarks(entries, out)
        if plot is not None:
            lines += [f"![benchmarks]({plot.name})", ""]
    aligned = [e for e in entries if e.stage in ALIGNMENT_STAGES and e.status == "complete"]
    starts = [p for e in aligned for p in e.parents if p.startswith("sft-")]
    sft_id = max(set(starts), key=starts.count) if starts else None
    if sft_id and starts.count(sft_id) > 1:
        compared = [e for e in aligned if sft_id in e.parents]
        table, plot = write_comparison(compared, out / "comparison", f"Alignment methods from {sft_id}")
        lines += ["## Alignment methods side by side", "",
                  f"Each tuned from `{sft_id}`; gold on the same held-out prompts, each gain against that SFT start "
                  f"sampled as the method samples (95% paired bootstrap interval); flaw rates SFT → tuned. An "
                  f"oracle entry trained on the demo's own judge: the upper bound of what RL reaches here, not a "
                  f"method to compare as one.", "", table, ""]
        if plot is not None:
            lines += [f"![gold by method](comparison/{plot.name})", ""]
    for e in entries:
        lines += [f"## {e.stage}: `{e.id}` ({e.status})", ""]
        if e.parents:
            lines += ["Parents: " + ", ".join(f"`{p}`" for p in e.parents), ""]
        if e.note:
            lines += [f"Note: {e.note}", ""]
        if e.metrics.get("eval_prompts", MIN_EVAL_PROMPTS) < MIN_EVAL_PROMPTS:
            lines += [f"**{e.metrics['eval_prompts']} held-out prompts: too few for its reward or gold gain to support "
                      f"a conclusion either way.** Hold out more prompts, or answer each several times "
                      f"(`eval.samples_per_prompt`).", ""]
        if e.metrics:
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                      for k, v in sorted(e.metrics.items())]
            lines.append("")
        for plot in (plot_training(e, out), plot_policy(e, out) if e.stage in CURVES else None):
            if plot is not None:
                lines += [f"![{plot.stem}]({plot.name})", ""]
        samples = Path(e.path) / "samples.md"
        if e.stage in ALIGNMENT_STAGES and samples.exists():
            lines += [f"### SFT and {e.stage.upper()} responses to the same held-out prompts", "", samples.read_text(),
                      ""]
    page = out / "report.md"
    page.write_text("\n".join(lines))
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n")[0])
    parser.add_argument("pipeline_id", nargs="?", help="the pipeline run (default: the newest)")
    parser.add_argument("--root", help="registry root (default: PIPELINE_HOME or runs)")
    args = parser.parse_args(argv)
    try:
        registry = Registry(args.root)
        pipeline_id = args.pipeline_id or latest_pipeline_id(registry)
        page = write_report(registry, pipeline_id)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((page.parent / "summary.txt").read_text(), end="")
    print(f"Report: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
