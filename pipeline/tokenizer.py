"""Tokenizers: a byte-level BPE trained on the corpus for models from scratch, or a given model's own,
both given what the later stages need: pad != eos, chat markers and a chat template whose end-of-turn
marker is the eos token (so generation, PPO's stop token and its missing-EOS penalty agree).
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>"]

# The assistant's turn, end-of-turn eos included, sits inside {% generation %} so that TRL's
# assistant-only loss trains the model to stop.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + '; expected system, user or assistant') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_bpe(texts: list[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (any text encodes, nothing is unknown) with the pipeline's special tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD, *CHAT_MARKERS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    bpe.train_from_iterator(texts, trainer, length=len(texts))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                  model_max_length=model_max_length)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def add_pipeline_tokens(tok) -> int:
    """Give a model's own tokenizer a pad token distinct from eos and a chat template, if it lacks them.

    Returns how many tokens were added (the model's embeddings must grow by as many).
    """
    added = 0
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        added += tok.add_special_tokens({"pad_token": PAD})
    if not tok.chat_template:
        added += tok.add_special_tokens({"additional_special_tokens": CHAT_MARKERS})
        tok.chat_template = CHAT_TEMPLATE
    return added


def tokenizer_fingerprint(tok) -> str:
    """Identical for tokenizers that split text the same way and share special tokens and chat template."""
    h = hashlib.sha256(tok.backend_tokenizer.to_str().encode())
    h.update(f"{tok.eos_token}|{tok.pad_token}|{tok.chat_template}".encode())
    return h.hexdigest()[:16]


WORD = re.compile(r"[^\W\d_]+")  # runs of letters


def coverage(tok, texts: list[str], frequent: int = 300, shown: int = 8) -> dict:
    """How finely tok splits texts: tokens per whitespace-separated word over all the texts, and among the
    `frequent` most common words those split into the most tokens (each as it appears after a space)."""
    ids = tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
    words = sum(len(t.split()) for t in texts)
    counts = Counter(w for t in texts for w in WORD.findall(t)).most_common(frequent)
    pieces = {w: len(tok(" " + w, add_special_tokens=False)["input_ids"]) for w, _ in counts}
    split = sorted((w for w, _ in counts if pieces[w] > 1), key=lambda w: -pieces[w])[:shown]
    return {"tokens_per_word": sum(map(len, ids)) / max(words, 1), "most_split": {w: pieces[w] for w in split},
            "lengths": [len(x) for x in ids]}
