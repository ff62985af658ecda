"""Load a reward model by reference and score (prompt, response) pairs in batches.

    from reward_model.scoring import RewardModel
    rm = RewardModel.load("reward:latest")
    rm.score(["Is this sentence positive or negative?\\n\\nMia loved the cake."], ["Positive."])

    python -m reward_model.scoring --model reward:latest --prompt "..." --response "..."
    python -m reward_model.scoring --model reward:latest --pairs pairs.jsonl   # accuracy on preference pairs

An ensemble (`make reward ARGS="reward.ensemble_size=4"`) scores as one: the members' mean, and with --response
their disagreement (the std of their normalised scores).

Texts are built exactly as TRL's RewardTrainer builds them in training: conversational rows through the
chat template (the score is read at the closing eos), plain rows as prompt + response + eos.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.models import load_reward_model
from pipeline.registry import Registry

STATS_FILE = "reward_stats.json"


def as_text(tok, prompt, response) -> str:
    """One (prompt, response) as the reward model reads it; prompt None for implicit-prompt rows."""
    if isinstance(response, str) and not (isinstance(prompt, list)):
        text = (prompt or "") + response
        return text if text.endswith(tok.eos_token) else text + tok.eos_token
    if isinstance(response, str):
        response = [{"role": "assistant", "content": response}]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    return tok.apply_chat_template((prompt or []) + response, tokenize=False)


class RewardModel:
    """A reward model, or an ensemble (one score output per member: separately trained models side by side, or
    heads on one backbone), scored as one: a response's score is the members' mean, and their disagreement is the
    std of their scores, each member's normalised by its own statistics (stats: member_mean, member_std, stored by
    `make reward`)."""

    def __init__(self, model, tok, stats: dict | None = None):
        self.model = model.eval()
        self.tok = tok
        self.stats = stats or {}
        self.members = model.config.num_labels

    @classmethod
    def load(cls, ref: str, root: str | None = None, trust_remote_code: bool = False) -> "RewardModel":
        resolved = Registry(root).resolve(ref)
        model, tok = load_reward_model(resolved.path, trust_remote_code)
        stats_file = Path(resolved.path) / STATS_FILE
        stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        return cls(model, tok, stats)

    @torch.no_grad()
    def member_scores_texts(self, texts: list[str], batch_size: int = 32,
                            add_special_tokens: bool = False) -> torch.Tensor:
        """Each member's raw score of each full text, (texts, members); add_special_tokens as TRL tokenizes plain
        (True) or templated (False) text."""
        self.tok.padding_side = "right"
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tok(texts[i:i + batch_size], return_tensors="pt", padding=True,
                             add_special_tokens=add_special_tokens)
            batch = {k: v.to(self.model.device) for k, v in batch.items()}
            out.append(self.model(**batch).logits.float().cpu())  # (B, members)
        return torch.cat(out) if out else torch.zeros(0, self.members)

    def score_texts(self, texts: list[str], batch_size: int = 32, add_special_tokens: bool = False) -> list[float]:
        """Scores of full texts: the members' mean (a single model's own score)."""
        return self.member_scores_texts(texts, batch_size, add_special_tokens).mean(1).tolist()

    def member_scores(self, prompts: list, responses: list, batch_size: int = 32) -> torch.Tensor:
        """Each member's raw score of each response to its prompt, (responses, members); a prompt may be None for
        implicit-prompt rows."""
        plain = isinstance(responses[0], str) and not isinstance(prompts[0], list)
        return self.member_scores_texts([as_text(self.tok, p, r) for p, r in zip(prompts, responses)], batch_size,
                                        add_special_tokens=plain)

    def normalised(self, members: torch.Tensor) -> torch.Tensor:
        """Member scores on each member's own scale: (score - member_mean) / member_std, with the stored statistics
        (the raw scores where there are none)."""
        if "member_mean" not in self.stats:
            return members
        mean, std = torch.tensor(self.stats["member_mean"]), torch.tensor(self.stats["member_std"])
        return (members - mean) / std.clamp(min=1e-6)

    def score_with_disagreement(self, prompts: list, responses: list,
                                batch_size: int = 32) -> tuple[list[float], list[float]]:
        """(scores: the members' mean, disagreement: the std of the members' normalised scores; 0 for a single
        model), per response."""
        members = self.member_scores(prompts, responses, batch_size)
        return members.mean(1).tolist(), self.normalised(members).std(1, unbiased=False).tolist()

    def score(self, prompts: list, responses: list, batch_size: int = 32) -> list[float]:
        """Raw scores of responses to prompts (the members' mean); a prompt may be None for implicit-prompt rows."""
        return self.member_scores(prompts, responses, batch_size).mean(1).tolist()

    def pair_member_scores(self, pairs: list[dict], batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """(members' raw scores of the chosen responses, of the rejected ones), each (pairs, members); each response
        scored once."""
        prompts = [p.get("prompt") for p in pairs]
        scores = self.member_scores(prompts * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                                    batch_size)
        return scores[:len(pairs)], scores[len(pairs):]

    def pair_scores(self, pairs: list[dict], batch_size: int = 32) -> tuple[list[float], list[float]]:
        """(scores of the chosen responses, scores of the rejected ones): the members' means."""
        chosen, rejected = self.pair_member_scores(pairs, batch_size)
        return chosen.mean(1).tolist(), rejected.mean(1).tolist()

    def pair_margins(self, pairs: list[dict], batch_size: int = 32) -> list[float]:
        """score(chosen) - score(rejected), per pair."""
        return [c - r for c, r in zip(*self.pair_scores(pairs, batch_size))]

    def pair_accuracy(self, pairs: list[dict], batch_size: int = 32) -> tuple[float, float]:
        """(share of pairs whose chosen response outscores the rejected one, mean margin)."""
        margins = self.pair_margins(pairs, batch_size)
        return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reward_model.scoring", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="reward:latest", help="registry reference, directory or hub id")
    ap.add_argument("--root", default=None, help="registry root (default: $PIPELINE_HOME or runs/)")
    ap.add_argument("--prompt", help="a prompt (user message)")
    ap.add_argument("--response", help="a response to score")
    ap.add_argument("--plain", action="store_true", help="score plain text, not a chat turn")
    ap.add_argument("--pairs", help="a .jsonl of preference pairs: prints the accuracy and mean margin")
    args = ap.parse_args(argv)
    try:
        rm = RewardModel.load(args.model, args.root)
        if args.pairs:
            rows = [json.loads(line) for line in open(args.pairs) if line.strip()]
            acc, margin = rm.pair_accuracy(rows)
            print(json.dumps({"pairs": len(rows), "accuracy": acc, "margin": margin}))
        elif args.response is not None:
            prompt, response = args.prompt, args.response
            if not args.plain:
                prompt = [{"role": "user", "content": prompt}] if prompt is not None else None
                response = [{"role": "assistant", "content": response}]
            score, spread = rm.score_with_disagreement([prompt], [response])
            print(json.dumps({"score": score[0], **({"disagreement": spread[0]} if rm.members > 1 else {})}))
        else:
            ap.error("give --response (with --prompt) or --pairs")
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
