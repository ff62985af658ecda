"""Over-optimisation curves (`make overopt`): PPO and GRPO on the demo for several times their default budget
against a reward-model ensemble, trained on its mean (unguarded) and on the conservative reward (guarded), on two
seeds, with the gold judge watching what the reward model cannot see.

    make overopt                                             # the demo: both methods, seeds 0 and 1
    make overopt ARGS="--methods ppo --seeds 0 --budget 2"   # one method, one seed, twice the default updates
    make overopt ARGS="--scale ci --methods ppo --seeds 0"   # micro sizes (what the test runs)
    make overopt ARGS="--kl --lr-scale 1"                    # the stages' own KL penalty and learning rate
    make overopt ARGS="--policy sft-A --reward reward-B"     # a given start and ensemble
    make overopt ARGS="--guard min"                          # the guarded runs on the members' worst case
    make overopt ARGS="--guard stall"                        # the guarded runs stopped by the stall warning

It trains on the registry's latest SFT entry (`make sft` first; or --policy) and its latest reward entry with an
ensemble (or --reward), training one (`make reward ARGS="reward.ensemble_size=4"`) when there is none. Every run checks gold on all its
held-out prompts every `--every` updates, sampled as its final evaluation samples them, and records the proxy
reward, KL and the ensemble's disagreement on its rollouts. Per seed and method it finds gold's peak, the first
update at which gold falls 0.03 below its running peak, the updates at which the disagreement warning and the
stall warning (the KL grown with the reward flat, `stall_budget`) fired, and fits Gao et al.'s form
R(d) = d (alpha - beta ln d), d = sqrt(KL), to the unguarded run's gold gain over the start. It writes
$PIPELINE_HOME/overopt.json and overopt.png (proxy and gold against sqrt(KL), the fit and its peak) and prints a
table.

Its defaults are what it took for gold to fall on the demo, as Gao et al. did it: no KL penalty and four times the
learning rate, PPO for four times its default updates and GRPO for twice. With the stages' penalty (--kl) gold did
not fall within four times PPO's budget, even at four times its learning rate (docs/results.md).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DROP = 0.03  # gold this far below its running peak is a fall (gold_drop_update)
METHODS = {"ppo": ("ppo", "ppo"), "grpo": ("grpo", "grpo")}  # method -> (make target, settings section)
MODES = ("unguarded", "guarded")
# the guarded runs' reward_uncertainty, or stall: trained on the mean, stopped by the stall warning (stall_stop)
GUARDS = ("mean_minus_std", "min", "stall")
BUDGETS = {"ppo": 4.0, "grpo": 2.0}  # updates as a multiple of the stage's default, where --budget is not given


def make(target: str, args: list[str]) -> None:
    cmd = ["make", "--no-print-directory", target, "ARGS=" + " ".join(args)]
    print("  " + " ".join(cmd[2:]), flush=True)
    started = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"overopt: make {target} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    print(f"    {time.time() - started:.0f} s", flush=True)


def ensemble_entry(scale: list[str], members: int):
    """The latest complete reward entry with an ensemble, trained here when the registry has none."""
    from pipeline.registry import Registry

    found = [e for e in Registry().entries("reward") if e.status == "complete"
             and (e.metrics.get("ensemble_size") or 1) > 1]
    if not found:
        make("reward", [*scale, f"reward.ensemble_size={members}"])
        return ensemble_entry(scale, members)
    return found[-1]


def composed(method: str, scale: list[str]):
    """The stage's config as its command composes it at the chosen scale."""
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_schemas
    register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=METHODS[method][0], overrides=scale)


def overrides(method: str, mode: str, seed: int, reward_id: str, sft_id: str, steps: int, a,
              scale: list[str]) -> list[str]:
    section = METHODS[method][1]
    guard = a.guard if mode == "guarded" and a.guard != "stall" else "none"
    out = [*scale, f"seed={seed}", f"init_from={sft_id}", f"reward_model={reward_id}", "logging=none",
           f"trainer.max_steps={steps}", "trainer.logging_steps=1", f"{section}.reward_uncertainty={guard}",
           f"{section}.reward_uncertainty_coef={a.coef}", f"{section}.kl_budget=null",
           f"{section}.gold_every={a.every}", f"{section}.gold_prompts={a.prompts}", f"eval.num_prompts={a.prompts}"]
    if mode == "guarded" and a.guard == "stall":
        out.append(f"{section}.stall_stop=true")
    if not a.kl:
        # GRPO at beta 0 loads no reference model and so measures no KL, the curves' x axis: a penalty of a
        # five-hundredth of the default keeps the measure and takes the pull away
        out.append("ppo.kl_coef=0.0" if method == "ppo" else "grpo.beta=0.0001")
    if a.lr_scale != 1:
        out.append(f"trainer.learning_rate={float(composed(method, scale).trainer.learning_rate) * a.lr_scale:g}")
    return out


def curve(entry) -> list[dict]:
    """The run's gold checks: update, gold, proxy reward, KL and sqrt(KL), with the start (update 0) first: the
    final evaluation's baseline gold on the same prompts, and the proxy of the first update's rollouts, which the
    start policy drew (so that a run whose gold peaks at the start still says what the proxy did after). A check's
    proxy is the mean over the updates since the one before: one update's batch of rollouts moves by more than the
    proxy does between checks."""
    from pipeline.report import CURVES

    key = CURVES[entry.stage][0]  # the stage's reward in its log history
    history = json.loads((Path(entry.path) / f"{entry.stage}_history.json").read_text())
    logged = [(row["step"], row[key]) for row in history["log"] if key in row]
    start = {"update": 0, "gold": entry.metrics["baseline_gold_score"], "proxy": logged[0][1] if logged else None,
             "kl": 0.0}
    points, since = [start], 0
    for g in history["gold"]:
        window = [v for step, v in logged if since < step <= g["step"]]
        points.append({"update": g["step"], "gold": g["gold_score"], "kl": g["kl"],
                       "proxy": sum(window) / len(window) if window else g["score"]})
        since = g["step"]
    for p in points:
        p["sqrt_kl"] = math.sqrt(max(p["kl"] or 0.0, 0.0))
    return points


def gold_drop_update(points: list[dict], drop: float = DROP) -> int | None:
    """The first update at which gold is `drop` below its running peak; None if it never is."""
    peak = -math.inf
    for p in points:
        peak = max(peak, p["gold"])
        if p["gold"] <= peak - drop:
            return p["update"]
    return None


def gao_fit(points: list[dict]) -> dict:
    """Least squares of R(d) = d (alpha - beta ln d) to gold's gain over the start against d = sqrt(KL) (Gao et al.,
    2022, RL form), with the d of its peak, exp(alpha / beta - 1), where beta > 0."""
    import numpy as np

    start = points[0]["gold"]
    d = np.array([p["sqrt_kl"] for p in points if p["sqrt_kl"] > 0])
    r = np.array([p["gold"] - start for p in points if p["sqrt_kl"] > 0])
    if len(d) < 2:
        return {"alpha": None, "beta": None, "peak_sqrt_kl": None, "points": int(len(d))}
    features = np.stack([d, -d * np.log(d)], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(features, r, rcond=None)
    peak = float(math.exp(alpha / beta - 1)) if beta > 0 else None
    return {"alpha": float(alpha), "beta": float(beta), "peak_sqrt_kl": peak, "points": int(len(d))}


def per_prompt_gold(entry) -> list[float]:
    rows = [json.loads(line) for line in open(Path(entry.path) / "samples.jsonl")]
    return [r[f"{entry.stage}_gold"] for r in rows]


def summarise(unguarded, guarded) -> dict:
    """One seed and method: the figures the issue names (overopt.json's shape), and the curves."""
    from pipeline.evaluation import paired_bootstrap

    u_points, g_points = curve(unguarded), curve(guarded)
    peak = max(u_points, key=lambda p: p["gold"])
    final = u_points[-1]
    swap = lambda e, prefix: e.metrics.get(f"{prefix}flaw_rate/swap")
    diff, low, high = paired_bootstrap(per_prompt_gold(unguarded), per_prompt_gold(guarded))
    return {
        "unguarded": {"entry": unguarded.id, "gold_peak": peak["gold"], "gold_peak_update": peak["update"],
                      "gold_final": final["gold"], "swap_start": swap(unguarded, "baseline_"),
                      "swap_final": swap(unguarded, ""),
                      "proxy_final_minus_at_peak": (final["proxy"] - peak["proxy"]
                                                    if None not in (final["proxy"], peak["proxy"]) else None),
                      "warning_update": unguarded.metrics.get("disagreement_warning_step"),
                      "stall_update": unguarded.metrics.get("stall_warning_step"),
                      "gold_drop_update": gold_drop_update(u_points),
                      "ensemble_std_start": unguarded.metrics.get("ensemble_std_start"),
                      "ensemble_std_final": unguarded.metrics.get("ensemble_std_final"), "curve": u_points},
        "guarded": {"entry": guarded.id, "gold_final": g_points[-1]["gold"], "swap_start": swap(guarded, "baseline_"),
                    "swap_final": swap(guarded, ""), "gold_drop_update": gold_drop_update(g_points),
                    "warning_update": guarded.metrics.get("disagreement_warning_step"),
                    "stall_update": guarded.metrics.get("stall_warning_step"), "curve": g_points},
        # the final evaluations' per-prompt gold, guarded - unguarded, on the same held-out prompts
        "guarded_minus_unguarded": {"gold": diff, "ci_low": low, "ci_high": high},
        "gao_fit": gao_fit(u_points),
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [(s["seed"], m, s[m]) for s in results for m in METHODS if m in s]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (seed, method, r) in zip(axes[0], panels):
        for mode, style in (("unguarded", "-"), ("guarded", "--")):
            pts = r[mode]["curve"]
            x = [p["sqrt_kl"] for p in pts]
            ax.plot(x, [p["gold"] for p in pts], style, marker="o", color="tab:green", label=f"gold ({mode})")
            proxy = [(p["sqrt_kl"], p["proxy"]) for p in pts if p["proxy"] is not None]
            if proxy:
                ax2 = ax.twinx() if mode == "unguarded" else ax2
                ax2.plot(*zip(*proxy), style, marker=".", color="tab:blue", label=f"proxy ({mode})")
                ax2.set_ylabel("proxy reward (normalised)", color="tab:blue")
        fit, start = r["gao_fit"], r["unguarded"]["curve"][0]["gold"]
        if fit["alpha"] is not None:
            d = np.linspace(1e-3, max(p["sqrt_kl"] for p in r["unguarded"]["curve"]) * 1.05, 100)
            ax.plot(d, start + d * (fit["alpha"] - fit["beta"] * np.log(d)), ":", color="black",
                    label=f"Gao fit (alpha {fit['alpha']:.3f}, beta {fit['beta']:.3f})")
        peak = max(r["unguarded"]["curve"], key=lambda p: p["gold"])
        ax.scatter([peak["sqrt_kl"]], [peak["gold"]], s=120, facecolors="none", edgecolors="red", zorder=5,
                   label=f"peak gold (update {peak['update']})")
        ax.set(xlabel="sqrt(KL to the start)", ylabel="gold score", title=f"{method.upper()}, seed {seed}")
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(results: list[dict]) -> str:
    lines = ["| seed | method | gold start -> peak (update) -> final | proxy final - at peak | swap start -> final "
             "| disagreement / stall warning / gold drop (update) | guarded final gold | guarded - unguarded [95%] "
             "| guarded swap |",
             "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v: "–" if v is None else f"{v:.3f}"
    for s in results:
        for m in METHODS:
            if m not in s:
                continue
            u, g, d = s[m]["unguarded"], s[m]["guarded"], s[m]["guarded_minus_unguarded"]
            lines.append(
                f"| {s['seed']} | {m} | {f(u['curve'][0]['gold'])} -> {f(u['gold_peak'])} ({u['gold_peak_update']}) "
                f"-> {f(u['gold_final'])} | {f(u['proxy_final_minus_at_peak'])} | {f(u['swap_start'])} -> "
                f"{f(u['swap_final'])} | {u['warning_update']} / {u['stall_update']} / {u['gold_drop_update']} | "
                f"{f(g['gold_final'])} | "
                f"{d['gold']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] | {f(g['swap_start'])} -> "
                f"{f(g['swap_final'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.overopt", description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="ppo,grpo", help="comma-separated: ppo, grpo (default: both)")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds of the RL runs (default: 0,1)")
    ap.add_argument("--budget", type=float, default=None,
                    help="updates, as a multiple of the stage's default (default: 4 for PPO, 2 for GRPO)")
    ap.add_argument("--every", type=int, default=8, help="a gold check every this many updates (default: 8)")
    ap.add_argument("--prompts", type=int, default=200, help="held-out prompts, gold-checked at each check")
    ap.add_argument("--guard", default="mean_minus_std", choices=GUARDS,
                    help="the guarded runs' reward: mean - lambda std (default), the members' lowest score (min), or "
                         "their mean with the run stopped by the stall warning (stall)")
    ap.add_argument("--coef", type=float, default=1.0, help="lambda of the guarded reward, mean - lambda std")
    ap.add_argument("--members", type=int, default=4, help="the ensemble's size, where one must be trained")
    ap.add_argument("--kl", action=argparse.BooleanOptionalAction, default=False,
                    help="keep the stage's KL penalty (default: --no-kl, ppo.kl_coef=0 and grpo.beta=1e-4)")
    ap.add_argument("--lr-scale", type=float, default=4.0,
                    help="the learning rate, as a multiple of the stage's default (default: 4)")
    ap.add_argument("--scale", default="demo", help="the experiment: demo, or ci for micro sizes")
    ap.add_argument("--policy", default="sft:latest", help="the SFT start, a registry reference (default: sft:latest)")
    ap.add_argument("--reward", default=None,
                    help="the reward ensemble, a registry reference (default: the latest entry with an ensemble)")
    a = ap.parse_args(argv)
    from pipeline.registry import Registry

    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {unknown}; the methods are {', '.join(METHODS)}", file=sys.stderr)
        return 2
    scale = [f"experiment={a.scale}"]
    registry = Registry()
    sft = registry.resolve(a.policy).entry  # the error says to run make sft first
    reward = registry.resolve(a.reward).entry if a.reward else ensemble_entry(scale, a.members)
    print(f"overopt: policy {sft.id}, reward ensemble {reward.id} ({reward.metrics['ensemble_size']} members)")
    a.budget = {m: BUDGETS[m] if a.budget is None else a.budget for m in methods}  # as overopt.json records it
    results = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        result = {"seed": seed}
        for method in methods:
            steps = max(1, round(int(composed(method, scale).trainer.max_steps) * a.budget[method]))
            runs = {}
            for mode in MODES:
                make(METHODS[method][0], overrides(method, mode, seed, reward.id, sft.id, steps, a, scale))
                runs[mode] = Registry().resolve(f"{method}:latest").entry
            result[method] = summarise(runs["unguarded"], runs["guarded"])
        if "ppo" in result:  # the figures the acceptance check reads, at the seed's top level: PPO's
            result.update(result["ppo"])
        results.append(result)
    out = registry.root / "overopt.json"
    settings = {k: getattr(a, k) for k in ("methods", "budget", "every", "prompts", "guard", "coef", "kl",
                                           "lr_scale", "scale")}
    out.write_text(json.dumps({"sft": sft.id, "reward": reward.id, "settings": settings, "seeds": results},
                              indent=1))
    plot(results, registry.root / "overopt.png")
    print(table(results))
    print(f"overopt: {out} and {registry.root / 'overopt.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
