"""Reward functions for GRPO and RLOO, in TRL's signature: f(prompts, completions, **columns) -> one float (or None)
per completion. A prompt is a list of chat messages (or a string), a completion a list holding the assistant's
message (or a string); the data set's other columns (the demo's `task`, ...) arrive as keyword lists.

    make grpo ARGS="reward_model=reward:latest reward_functions=[pipeline.rewards:no_repeated_sentences]"
    make grpo ARGS="reward_functions=[mypackage.rewards:is_valid_json]"     # any importable module:function

A function of your own is named as module:function, the module importable from where `make` runs.
"""
from __future__ import annotations

import importlib
import re
from typing import Callable

from pipeline import demo
from pipeline.errors import PipelineError

# Functions known by a short name. The demo's gold judge is one only under its explicit name: an oracle.
NAMED = {"demo_oracle": "pipeline.rewards:demo_oracle"}
ORACLES = ("demo_oracle",)


def text_of(x) -> str:
    """The text of a prompt or completion: a string, or the last message of a conversation."""
    return x if isinstance(x, str) else x[-1]["content"]


def demo_oracle(prompts, completions, **columns) -> list[float]:
    """The demo's gold judge (pipeline/demo.py): the true quality of each response, which no deployed reward can
    see. Training on it shows the upper bound of what RL reaches on the demo."""
    return [demo.gold_score(text_of(p), text_of(c)) for p, c in zip(prompts, completions)]


def no_repeated_sentences(prompts, completions, **columns) -> list[float]:
    """Minus the share of a response's sentences that repeat an earlier one (0 for a response without repeats)."""
    out = []
    for c in completions:
        sentences = [s.strip().lower() for s in re.split(r"(?<=[.!?])\s+", text_of(c)) if s.strip()]
        out.append(-(len(sentences) - len(set(sentences))) / max(len(sentences), 1))
    return out


def resolve_reward_function(name: str) -> Callable:
    """The function a reward_functions entry names (module:function, or a name of NAMED), or a PipelineError
    saying what is wrong with the name."""
    target = NAMED.get(name, name)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise PipelineError(f"reward function '{name}': give it as module:function (e.g. "
                            f"pipeline.rewards:no_repeated_sentences), or by a known name ({', '.join(NAMED)})")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise PipelineError(f"reward function '{name}': cannot import module '{module_name}' ({type(e).__name__}: "
                            f"{e}); it must be importable from the directory `make` runs in") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise PipelineError(f"reward function '{name}': module '{module_name}' has no function '{attr}'")
    return fn
