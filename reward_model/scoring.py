"""Load a reward model by reference and score (prompt, response) pairs in batches.

    from reward_model.scoring import RewardModel
    rm = RewardModel.load("reward:latest")
    rm.score(["Is this sentence positive or negative?\\n\\nMia loved the cake."], ["Positive."])

    python -m reward_model.scoring --model reward:latest --prompt "..." --response "..."
    python -m reward_model.scoring --model reward:latest --pairs pairs.jsonl   # accuracy on preference pairs

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
    def __init__(self, model, tok, stats: dict | None = None):
        self.model = model.eval()
        self.tok = tok
        self.stats = stats or {}

    @classmethod
    def load(cls, ref: str, root: str | None = None, trust_remote_code: bool = False) -> "RewardModel":
        resolved = Registry(root).resolve(ref)
        model, tok = load_reward_model(resolved.path, trust_remote_code)
        stats_file = Path(resolved.path) / STATS_FILE
        stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        return cls(model, tok, stats)

    @torch.no_grad()
    def score_texts(self, texts: list[str], batch_size: int = 32, add_special_tokens: bool = False) -> list[float]:
        """Scores of full texts; add_special_tokens as TRL tokenizes plain (True) or templated (False) text."""
        self.tok.padding_side = "right"
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tok(texts[i:i + batch_size], return_tensors="pt", padding=True,
                             add_special_tokens=add_special_tokens)
            batch = {k: v.to(self.model.device) for k, v in batch.items()}
            out += self.model(**batch).logits[:, 0].float().tolist()  # (B,)
        return out

    def score(self, prompts: list, responses: list, batch_size: int = 32) -> list[float]:
        """Raw scores of responses to prompts (a prompt may be None for implicit-prompt rows)."""
        plain = isinstance(responses[0], str) and not isinstance(prompts[0], list)
        return self.score_texts([as_text(self.tok, p, r) for p, r in zip(prompts, responses)], batch_size,
                                add_special_tokens=plain)

    def pair_scores(self, pairs: list[dict], batch_size: int = 32) -> tuple[list[float], list[float]]:
        """(scores of the chosen responses, scores of the rejected ones), each response scored once."""
        prompts = [p.get("prompt") for p in pairs]
        scores = self.score(prompts * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], batch_size)
        return scores[:len(pairs)], scores[len(pairs):]

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
            print(json.dumps({"score": rm.score([prompt], [response])[0]}))
        else:
            ap.error("give --response (with --prompt) or --pairs")
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
