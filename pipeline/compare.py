"""The alignment methods side by side: every complete PPO, DPO, GRPO and RLOO entry tuned from one SFT entry, in
one table (gold against the shared start with its 95% interval, per-class flaw rates, KL, reward, wall time) and
one plot of gold by method.

    python -m pipeline.compare                 # the newest SFT entry (make compare)
    python -m pipeline.compare sft:best        # any reference to an SFT entry (make compare SFT=...)

Writes <registry root>/comparisons/<sft id>/compare.md and gold_by_method.png; `make report` includes the same
table for the alignment entries of a pipeline run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import demo
from pipeline.errors import PipelineError
from pipeline.registry import ALIGNMENT_STAGES, Entry, Registry


def aligned_from(registry: Registry, sft_id: str) -> list[Entry]:
    """The complete alignment entries whose policy started from this SFT entry, oldest first."""
    return [e for e in registry.entries() if e.stage in ALIGNMENT_STAGES and e.status == "complete"
            and sft_id in e.parents]


def method(e: Entry) -> str:
    """The method's name in the table: the stage, with what it was rewarded by where that is not the default."""
    cfg = e.config
    extra = []
    if e.stage in ("grpo", "rloo") and cfg.get("reward_functions"):
        extra.append("+".join(str(f).split(":")[-1] for f in cfg["reward_functions"]))
    if e.metrics.get("oracle"):
        extra.append("oracle: upper bound")
    return e.stage.upper() + (f" ({', '.join(extra)})" if extra else "")


def comparison_table(entries: list[Entry]) -> str:
    """Markdown: one row per entry. Gold is measured on the same held-out prompts for every method; each gain
    is against the SFT start sampled as that method samples."""
    classes = [c for c in demo.FLAWS if any(f"flaw_rate/{c}" in e.metrics for e in entries)]
    head = ["method", "entry", "gold SFT → tuned", "gain [95%]", *classes, "KL", "reward", "wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    num = lambda v, f="{:.3f}": "–" if v is None else f.format(v)
    for e in entries:
        m = e.metrics
        gold = f"{num(m.get('baseline_gold_score'))} → {num(m.get('gold_score'))}"
        gain = (f"{m['gold_gain']:+.3f} [{m['gold_gain_ci_low']:+.3f}, {m['gold_gain_ci_high']:+.3f}]"
                if "gold_gain_ci_low" in m else "–")
        rates = [f"{num(m.get(f'baseline_flaw_rate/{c}'), '{:.2f}')} → {num(m.get(f'flaw_rate/{c}'), '{:.2f}')}"
                 for c in classes]
        wall = m.get("wall_time_s")
        lines.append("| " + " | ".join([method(e), f"`{e.id}`", gold, gain, *rates, num(m.get("kl"), "{:.2f}"),
                                        num(m.get("reward_mean"), "{:.2f}"),
                                        "–" if wall is None else f"{wall / 60:.1f} min"]) + " |")
    return "\n".join(lines)


def plot_gold(entries: list[Entry], path: Path) -> Path | None:
    """Gold by method: the SFT start and each tuned policy, with the gain's 95% interval as an error bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [e for e in entries if "gold_score" in e.metrics]
    if not scored:
        return None
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(scored), 3.8))
    xs = range(len(scored))
    golds = [e.metrics["gold_score"] for e in scored]
    low = [e.metrics["gold_gain"] - e.metrics.get("gold_gain_ci_low", e.metrics["gold_gain"]) for e in scored]
    high = [e.metrics.get("gold_gain_ci_high", e.metrics["gold_gain"]) - e.metrics["gold_gain"] for e in scored]
    colours = ["tab:grey" if e.metrics.get("oracle") else "tab:blue" for e in scored]
    ax.bar(xs, golds, color=colours, yerr=[low, high], capsize=4, alpha=0.85)
    ax.scatter(xs, [e.metrics["baseline_gold_score"] for e in scored], marker="_", s=600, color="black",
               zorder=3, label="SFT start (as the method samples)")
    ax.set_xticks(list(xs), [method(e).replace(" (", "\n(") for e in scored], fontsize=8)
    ax.set(ylabel="gold score (held-out prompts)", ylim=(0, 1), title="Gold by method (bars: 95% interval of the gain)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_comparison(entries: list[Entry], out: Path, title: str) -> tuple[str, Path | None]:
    """The table (returned, and in out/compare.md) and the plot (out/gold_by_method.png)."""
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_table(entries)
    plot = plot_gold(entries, out / "gold_by_method.png")
    lines = [f"# {title}", "", table, ""] + ([f"![gold by method]({plot.name})", ""] if plot else [])
    (out / "compare.md").write_text("\n".join(lines))
    return table, plot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__.split("\n")[0])
    parser.add_argument("sft", nargs="?", default="sft:latest", help="the SFT entry (a registry reference)")
    parser.add_argument("--root", help="registry root (default: PIPELINE_HOME or runs)")
    args = parser.parse_args(argv)
    try:
        registry = Registry(args.root)
        sft = registry.resolve(args.sft).entry
        if sft is None or sft.stage != "sft":
            raise PipelineError(f"'{args.sft}' is not an SFT entry of the registry at {registry.root}")
        entries = aligned_from(registry, sft.id)
        if not entries:
            raise PipelineError(f"no complete PPO, DPO, GRPO or RLOO entry starts from {sft.id}: run make ppo, "
                                f"make dpo or make grpo first")
        out = registry.root / "comparisons" / sft.id
        table, _ = write_comparison(entries, out, f"Alignment methods from {sft.id}")
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"\nComparison: {out / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
