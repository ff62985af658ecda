"""The four stages as a practitioner writes them with transformers and TRL alone (no pipeline code): the
other side of `python -m bench.parity`.

    python bench/plain_rlhf.py --data DIR --out DIR [--seed 0]

DIR holds corpus.jsonl ({"text"}), sft.jsonl ({"messages"}), pairs.jsonl (conversational prompt/chosen/
rejected) and prompts.jsonl ({"prompt": [messages]}). Writes OUT/{pretrain,sft,reward,ppo} (Hugging Face
directories) and OUT/plain.json (pretraining eval loss before and after, seconds per stage).

The tokenizer: a byte-level BPE trained on everything the model will read, the pretraining stories and the
fine-tuning text (demonstrations, pairs, prompts), as one does for a model trained from scratch on known
data; pad and chat markers are special tokens, and the chat template ends each turn with eos.
Hyper-parameters are the stages' where they are named below (precision too: --bf16 STAGE... for the stages
the pipeline trains in bf16); everything else is the libraries' default.
"""
import argparse
import json
import time
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments,
                          default_data_collator, set_seed)
from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
from trl.experimental.ppo import PPOConfig, PPOTrainer

TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}"
            "{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% else %}<|{{ m['role'] }}|>{{ m['content'] }}"
            "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def precision(a, stage):
    """The stage's precision, and the device: transformers refuses bf16 without a GPU unless told it runs on the CPU."""
    return {"bf16": stage in a.bf16, "use_cpu": not torch.cuda.is_available()}


def read(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def texts_of(row):
    """Every string in a row (message contents included)."""
    for v in row.values():
        if isinstance(v, str):
            yield v
        elif isinstance(v, list):
            for m in v:
                yield m["content"]


def train_tokenizer(docs, extra, vocab_size, block):
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
    bpe.train_from_iterator(docs + extra, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                  model_max_length=block)
    tok.chat_template = TEMPLATE
    return tok


def pretrain(a, data, out):
    docs = [r["text"] for r in read(data / "corpus.jsonl")]
    extra = [t for f in ("sft", "pairs", "prompts") for r in read(data / f"{f}.jsonl") for t in texts_of(r)]
    tok = train_tokenizer(docs, extra, a.vocab_size, a.block_size)
    n_eval = max(1, len(docs) // 50)

    def blocks(texts):
        ids = [t for doc in tok(texts)["input_ids"] for t in doc + [tok.eos_token_id]]
        n = len(ids) // a.block_size * a.block_size
        chunks = [ids[i:i + a.block_size] for i in range(0, n, a.block_size)]
        return Dataset.from_dict({"input_ids": chunks, "labels": chunks})

    train, held = blocks(docs[n_eval:]), blocks(docs[:n_eval]).select(range(200))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, intermediate_size=688, max_position_embeddings=a.block_size,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    args = TrainingArguments(out / "trainer-pretrain", max_steps=a.pretrain_steps, per_device_train_batch_size=32,
                             learning_rate=2e-3, warmup_steps=30, lr_scheduler_type="cosine", logging_steps=25,
                             save_strategy="no", report_to=[], seed=a.seed, **precision(a, "pretrain"))
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held,
                      data_collator=default_data_collator)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    trainer.save_model(out / "pretrain")
    tok.save_pretrained(out / "pretrain")
    return {"pretrain_initial_eval_loss": before, "pretrain_eval_loss": after}


def sft(a, data, out):
    rows = [{"messages": r["messages"]} for r in read(data / "sft.jsonl")]
    args = SFTConfig(out / "trainer-sft", max_steps=a.sft_steps, per_device_train_batch_size=16, learning_rate=5e-4,
                     warmup_steps=20, assistant_only_loss=True, max_length=512, logging_steps=25,
                     save_strategy="no", report_to=[], seed=a.seed, **precision(a, "sft"))
    trainer = SFTTrainer(model=str(out / "pretrain"), args=args, train_dataset=Dataset.from_list(rows))
    trainer.train()
    trainer.save_model(out / "sft")
    trainer.processing_class.save_pretrained(out / "sft")
    return {}


def reward(a, data, out):
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in read(data / "pairs.jsonl")]
    args = RewardConfig(out / "trainer-reward", num_train_epochs=a.reward_epochs, per_device_train_batch_size=16,
                        learning_rate=3e-4, max_length=512, logging_steps=25, save_strategy="no", report_to=[],
                        seed=a.seed, **precision(a, "reward"))
    trainer = RewardTrainer(model=str(out / "sft"), args=args, train_dataset=Dataset.from_list(rows))
    trainer.train()
    trainer.save_model(out / "reward")
    trainer.processing_class.save_pretrained(out / "reward")
    return {}


def ppo(a, data, out):
    tok = PreTrainedTokenizerFast.from_pretrained(out / "sft", padding_side="left")
    prompts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
               for r in read(data / "prompts.jsonl")]
    ds = Dataset.from_dict({"input_ids": tok(prompts, add_special_tokens=False)["input_ids"]})
    policy, ref = (AutoModelForCausalLM.from_pretrained(out / "sft") for _ in range(2))
    rm, value = (AutoModelForSequenceClassification.from_pretrained(out / "reward", num_labels=1) for _ in range(2))
    args = PPOConfig(out / "trainer-ppo", total_episodes=a.ppo_episodes, per_device_train_batch_size=64,
                     num_mini_batches=4, num_ppo_epochs=2, learning_rate=3e-5, response_length=80,
                     stop_token="eos", temperature=1.0, missing_eos_penalty=1.0, kl_coef=0.05,
                     num_sample_generations=0, save_strategy="no", report_to=[], seed=a.seed, **precision(a, "ppo"))
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                         value_model=value, train_dataset=ds, eval_dataset=ds.select(range(16)))
    trainer.train()
    trainer.save_model(out / "ppo")
    tok.save_pretrained(out / "ppo")
    return {}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--pretrain-steps", type=int, default=500)
    ap.add_argument("--sft-steps", type=int, default=250)
    ap.add_argument("--reward-epochs", type=float, default=2)
    ap.add_argument("--ppo-episodes", type=int, default=2048)
    ap.add_argument("--stages", default="pretrain,sft,reward,ppo")
    ap.add_argument("--bf16", nargs="*", default=[], metavar="STAGE",
                    help="the stages trained in bf16 autocast (as the pipeline's stages are where it pays)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    result_file = a.out / "plain.json"
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    for name in a.stages.split(","):
        if f"{name}_seconds" in result and (a.out / name).is_dir():
            print(f"plain {name}: done before ({a.out / name})", flush=True)  # a long run picks up where it stopped
            continue
        set_seed(a.seed)
        started = time.time()
        result.update(globals()[name](a, a.data, a.out))
        result[f"{name}_seconds"] = time.time() - started
        result_file.write_text(json.dumps(result, indent=2))
        print(f"plain {name}: {result[f'{name}_seconds']:.0f} s", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
