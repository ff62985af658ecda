"""How a reward ensemble's members disagree, per flaw class of the demo's held-out pairs, measured several ways.

    python -m bench.ensemble_diversity reward:latest                     # an ensemble entry: its heads are the members
    python -m bench.ensemble_diversity reward-a reward-b reward-c ...    # separate entries: each one's score a member

The pairs are the held-out pairs of the first entry's config (the demo's, which name their flaw class); each member's
scores are normalised by its own mean and std over those pairs' responses. Per class it prints the std of the members'
normalised scores (per pair, averaged over its two responses: `eval_disagreement`'s measure; and on the rejected
response alone), the std of their normalised margins, the std of their probabilities that the chosen response is
the better (sigmoid of each member's margin, as Bradley-Terry training reads it), the share of members against the
majority's preference, and each member's accuracy; then each measure on swap pairs over its mean on the other classes.
"""
from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import torch

MEASURES = ("pair_std", "rejected_std", "margin_std", "preference_std", "against_majority")


def diversity(chosen: torch.Tensor, rejected: torch.Tensor, classes: list[str]) -> dict[str, dict]:
    """Per class, from the members' raw scores of the chosen and rejected responses, each (pairs, members)."""
    both = torch.cat([chosen, rejected])
    mean, std = both.mean(0), both.std(0, unbiased=False).clamp(min=1e-6)
    zc, zr = (chosen - mean) / std, (rejected - mean) / std
    margin = zc - zr
    out = {}
    for cls in sorted(set(classes)):
        idx = [i for i, k in enumerate(classes) if k == cls]
        prefers = (margin[idx] > 0).float()
        out[cls] = {
            "pairs": len(idx),
            "pair_std": ((zc[idx].std(1, unbiased=False) + zr[idx].std(1, unbiased=False)) / 2).mean().item(),
            "rejected_std": zr[idx].std(1, unbiased=False).mean().item(),
            "margin_std": margin[idx].std(1, unbiased=False).mean().item(),
            # each member's Bradley-Terry probability that the chosen response is the better, from its raw margin
            "preference_std": torch.sigmoid(chosen[idx] - rejected[idx]).std(1, unbiased=False).mean().item(),
            "against_majority": torch.minimum(prefers.mean(1), 1 - prefers.mean(1)).mean().item(),
            "member_accuracy": prefers.mean(0).tolist(),
            "ensemble_accuracy": (margin[idx].mean(1) > 0).float().mean().item(),
        }
    return out


def swap_ratios(per_class: dict[str, dict]) -> dict[str, float]:
    """Each measure on swap pairs over its mean on the other classes."""
    others = [v for k, v in per_class.items() if k != "swap"]
    ratio = lambda a, b: a / b if b > 0 else (math.inf if a > 0 else 1.0)
    return {m: ratio(per_class["swap"][m], statistics.fmean(v[m] for v in others)) for m in MEASURES}


def main(argv: list[str] | None = None) -> int:
    refs = sys.argv[1:] if argv is None else argv
    if not refs:
        print(__doc__)
        return 2
    from pipeline.config import PairData
    from pipeline.data import load_preference_data
    from pipeline.registry import Registry
    from reward_model.scoring import RewardModel

    registry = Registry()
    cfg = registry.resolve(refs[0]).entry.config
    _, held = load_preference_data(PairData(**cfg["data"]), cfg["seed"], registry.root / "cache")
    classes = [p.pop("flaw", None) or "unknown" for p in held]
    scores = [RewardModel.load(ref).pair_member_scores(held) for ref in refs]
    per_class = diversity(torch.cat([c for c, _ in scores], 1), torch.cat([r for _, r in scores], 1), classes)
    for cls, v in per_class.items():
        print(f"{cls:12} " + " ".join(f"{k} {v[k]:.3f}" for k in (*MEASURES, "ensemble_accuracy"))
              + " members " + ", ".join(f"{a:.3f}" for a in v["member_accuracy"]) + f" ({v['pairs']} pairs)")
    if "swap" in per_class:
        print("swap / others: " + ", ".join(f"{k} {v:.2f}x" for k, v in swap_ratios(per_class).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
