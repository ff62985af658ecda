"""Cost curves (`make bench ARGS="scaling=true"`): the pretraining stage's speed, model-FLOPs utilisation and peak
memory across model sizes and sequence lengths, each a short run of the real stage, plotted log-log."""
from __future__ import annotations

import json
from pathlib import Path

SIZES = ("tiny", "small", "medium")  # conf/model: ~0.1M, ~3.4M and ~25M parameters (with the demo's vocabulary)
LENGTHS = (128, 256, 512)
BATCH = 16
STEPS = 12  # per point; the stage's first 5 steps are warm-up and not counted


def measure(make_stage, flops_per_token, root: Path, extra: str, peak: float) -> list[dict]:
    """One short pretraining run per (size, sequence length): steady tokens/s, seconds per step, MFU against the
    machine's measured matmul peak, the process's peak memory."""
    points = []
    for size in SIZES:
        for length in LENGTHS:
            e = make_stage("pretrain", root, f"model={size} data.block_size={length} trainer.max_steps={STEPS} "
                                             f"trainer.save_steps={STEPS} trainer.per_device_train_batch_size={BATCH} "
                                             f"data.num_documents=4000 data.max_eval_blocks=4 {extra}")
            m, flops = e["metrics"], flops_per_token(e)
            points.append({"model": size, "block_size": length, "parameters": m["parameters"],
                           "tokens_per_step": BATCH * length, "flops_per_step": flops * BATCH * length,
                           "seconds_per_step": m["steady_seconds_per_step"], "tokens_per_s": m["steady_tokens_per_s"],
                           "mfu": m["steady_tokens_per_s"] * flops / peak, "peak_rss_mb": m["peak_rss_mb"]})
            p = points[-1]
            print(f"  {size:6s} {length:4d} tokens: {p['tokens_per_s']:8.0f} tokens/s, {p['seconds_per_step']:.3f} s/step, "
                  f"MFU {p['mfu']:.3f}, peak {p['peak_rss_mb']:.0f} MB", flush=True)
    return points


def slope(xs: list[float], ys: list[float]) -> float:
    """The least-squares slope of log y on log x: how cost grows with work (1: in proportion)."""
    import math

    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def plot(points: list[dict], path: Path) -> None:
    """Seconds per step against FLOPs per step, MFU and peak memory against parameters; log-log, a line per
    sequence length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for length in LENGTHS:
        row = [p for p in points if p["block_size"] == length]
        label = f"{length} tokens x {BATCH}"
        axes[0].loglog([p["flops_per_step"] for p in row], [p["seconds_per_step"] for p in row], "o-", label=label)
        axes[1].loglog([p["parameters"] for p in row], [p["mfu"] for p in row], "o-", label=label)
        axes[2].loglog([p["parameters"] for p in row], [p["peak_rss_mb"] for p in row], "o-", label=label)
    xs = sorted(p["flops_per_step"] for p in points)
    first = min(points, key=lambda p: p["flops_per_step"])
    axes[0].loglog(xs, [first["seconds_per_step"] * x / xs[0] for x in xs], "k:", label="in proportion to work")
    for ax, title, x, y in ((axes[0], "time per step", "model FLOPs per step", "seconds per step"),
                            (axes[1], "model-FLOPs utilisation", "parameters", "MFU (of the measured matmul peak)"),
                            (axes[2], "peak memory (process RSS)", "parameters", "MB")):
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scaling(make_stage, flops_per_token, root: Path, home: Path, extra: str, peak: float) -> dict:
    points = measure(make_stage, flops_per_token, root, extra, peak)
    largest = [p for p in points if p["model"] == SIZES[-1]]
    out = {"points": points,
           "time_vs_work_slope": slope([p["flops_per_step"] for p in points], [p["seconds_per_step"] for p in points]),
           f"time_vs_work_slope_{SIZES[-1]}": slope([p["flops_per_step"] for p in largest],
                                                   [p["seconds_per_step"] for p in largest])}
    png = home / "scaling.png"
    plot(points, png)
    (home / "scaling.json").write_text(json.dumps(out, indent=2))
    out["plot"] = str(png)
    return out
