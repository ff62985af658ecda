"""The handoff checks at the start of a stage: does the tokenizer cover this stage's data as it covered the
pretraining corpus, and do a policy and its reward model read the same tokens the same way?"""
from __future__ import annotations

from pipeline.data import row_texts
from pipeline.errors import PipelineError
from pipeline.tokenizer import coverage, tokenizer_fingerprint

# Warn when a stage's data is split this many times as finely as the pretraining corpus, or when more than this
# share of its examples is longer than the pretrained context.
COVERAGE_WARNING = 1.25
LONG_WARNING = 0.01


def check_data_coverage(run, tok, rows: list[dict], model, sample: int = 2000) -> None:
    """The handoff from pretraining: does the tokenizer cover this stage's data as it covered the pretraining
    corpus, and does the data fit the context the model was pretrained on? Warns with the remedy and records
    both figures (handoff_tokens_per_word_ratio, handoff_long_share) in the entry."""
    texts = [" ".join(row_texts(r)) for r in rows[:sample]]
    cov = coverage(tok, texts)
    pretrained = next((e for _, e in run.registry.lineage(run.inputs["init_from"].entry.id)
                       if e.stage == "pretrain"), None) if run.inputs["init_from"].entry else None
    pm = pretrained.metrics if pretrained else {}
    context = pm.get("context_length") or model.config.max_position_embeddings
    long_share = sum(n > context for n in cov["lengths"]) / max(len(texts), 1)
    figures = {"handoff_tokens_per_word": cov["tokens_per_word"], "handoff_long_share": long_share}
    split = ", ".join(f"'{w}' ({n} tokens)" for w, n in cov["most_split"].items())
    if "corpus_tokens_per_word" in pm:
        ratio = cov["tokens_per_word"] / pm["corpus_tokens_per_word"]
        figures["handoff_tokens_per_word_ratio"] = ratio
        run.log(f"Tokenizer coverage: {cov['tokens_per_word']:.2f} tokens per word in this data, "
                f"{pm['corpus_tokens_per_word']:.2f} in the pretraining corpus ({pretrained.id})")
        if ratio > COVERAGE_WARNING:
            run.warn(f"the tokenizer splits this stage's words {ratio:.1f}x as finely as the pretraining "
                     f"corpus's; frequent words split most: {split}. The corpus hardly uses this stage's language, "
                     f"so the model must learn to read it here. Pretrain on text that uses it (add such text to "
                     f"the corpus), or start from a model that knows it (init_from=HUB_ID). A tokenizer retrained "
                     f"with this text alone (tokenizer.extra_text=[PATH]) splits the words less, but its new tokens "
                     f"stay untrained where the corpus lacks them: measured so, it did not raise gold after SFT "
                     f"(docs/results.md, \"The tokenizer warning's advice\")")
    if long_share > LONG_WARNING:
        run.warn(f"{long_share:.0%} of this stage's examples are longer than the {context} tokens the model "
                 f"was pretrained on: their later positions were never trained. Pretrain with a longer "
                 f"data.block_size, or shorten the examples (data.max_length)")
    run.record(**figures)


def check_reward_handoff(policy_tok, reward_tok, policy_name: str, reward_name: str) -> None:
    """Refuse a policy and reward model that would read the same tokens differently."""
    for name, tok in ((policy_name, policy_tok), (reward_name, reward_tok)):
        if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
            raise PipelineError(f"{name}: the pad token must differ from eos (pad={tok.pad_token!r}, "
                                f"eos={tok.eos_token!r}); the score is read at the eos and the padding masked")
        if not tok.chat_template:
            raise PipelineError(f"{name}: the tokenizer has no chat template; fine-tune with `make sft` first")
    if tokenizer_fingerprint(policy_tok) != tokenizer_fingerprint(reward_tok):
        diffs = [f"{what}: {a!r} vs {b!r}" for what, a, b in (
            ("vocabulary size", len(policy_tok), len(reward_tok)),
            ("eos", policy_tok.eos_token, reward_tok.eos_token),
            ("pad", policy_tok.pad_token, reward_tok.pad_token),
            ("chat template", policy_tok.chat_template[:40], reward_tok.chat_template[:40])) if a != b]
        raise PipelineError(f"tokenizer mismatch between the policy ({policy_name}) and the reward model "
                            f"({reward_name}): {'; '.join(diffs) or 'the vocabularies or merges differ'}. "
                            f"Train the reward model from this policy's lineage (make reward).")
