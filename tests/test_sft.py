"""The fine-tuning stage: assistant-only loss on the collated batch, and the real command end to end."""
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline import demo
from pipeline.run import StageRun
from pipeline.tokenizer import train_bpe
from tests.conftest import complete_entries, compose, copy_registry, make, registry_entries

CI = "experiment=ci"


def ci_config(overrides=()):
    return compose("sft", [CI, *overrides])


def tiny_model(tok):
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion", "conversational_prompt_completion"])
def test_only_response_tokens_carry_loss(tmp_path, fmt):
    from stages.sft import build_trainer
    tok = train_bpe(demo.generate_corpus(300, 0), 400, 128)
    rows = demo.generate_demonstrations(8, 0, flawed_share=0.0)
    if fmt == "prompt_completion":
        rows = [{"prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"]} for r in rows]
    elif fmt == "conversational_prompt_completion":
        rows = [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows]
    else:
        rows = [{"messages": r["messages"]} for r in rows]
    run = StageRun.standalone("sft", ci_config(), tmp_path)
    trainer = build_trainer(run, tiny_model(tok), tok, rows, rows[:2])
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["labels"].shape == batch["input_ids"].shape
    answers = {(r["messages"][1]["content"] if fmt == "messages" else
                r["completion"] if fmt == "prompt_completion" else r["completion"][0]["content"]) for r in rows}
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        trained = ids[labels != -100].tolist()
        text = tok.decode(trained)
        assert text.endswith(tok.eos_token)  # the model learns to stop
        assert text[:-len(tok.eos_token)].strip() in answers  # and nothing of the prompt or the padding
        assert tok.pad_token_id not in trained


def test_padding_free_batches_give_the_padded_loss(tmp_path):
    """A flattened batch has no padding, and its sequences do not see each other: same loss as padded."""
    from stages.sft import build_trainer
    tok = train_bpe(demo.generate_corpus(300, 0), 400, 128)
    rows = [{"messages": r["messages"]} for r in demo.generate_demonstrations(8, 0)]
    torch.manual_seed(0)
    model = tiny_model(tok).eval()
    losses = {}
    for batching in ("padded", "padding_free"):
        run = StageRun.standalone("sft", ci_config([f"batching={batching}"]), tmp_path / batching)
        trainer = build_trainer(run, model, tok, rows, rows[:2])
        batch = next(iter(trainer.get_eval_dataloader()))
        real = int((batch["labels"] != -100).sum())
        with torch.no_grad():
            losses[batching] = model(**batch, use_cache=False).loss.item()
        if batching == "padding_free":
            assert batch["input_ids"].shape[0] == 1 and tok.pad_token_id not in batch["input_ids"]
            assert "attention_mask" not in batch and real > 0
    assert losses["padding_free"] == pytest.approx(losses["padded"], abs=1e-5)


def test_auto_batching_flattens_only_under_flash_attention():
    from stages.sft import padding_free
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))
    assert not padding_free("auto", model) and padding_free("padding_free", model)
    model.config._attn_implementation = "flash_attention_2"
    assert padding_free("auto", model) and not padding_free("padded", model)


@pytest.fixture
def home_with_pretrain(ci_pretrained, tmp_path):
    return copy_registry(ci_pretrained, tmp_path)


def complete(home, stage="sft"):
    return complete_entries(home, stage)


@pytest.mark.slow
def test_sft_learns_from_pretrain_latest(home_with_pretrain):
    home = home_with_pretrain
    [pre] = complete(home, "pretrain")
    r = make("sft", home, CI)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    [e] = complete(home)
    m = e["metrics"]
    assert e["parents"] == [pre["id"]]
    assert m["eval_loss"] < m["initial_eval_loss"]
    samples = [json.loads(l) for l in open(Path(e["path"]) / "samples.jsonl")]
    # the figures are those of the saved samples, start (pretrain) and fine-tuned model on the same prompts
    assert m["gold_score"] == pytest.approx(sum(s["sft_gold"] for s in samples) / len(samples))
    assert m["baseline_gold_score"] == pytest.approx(sum(s["pretrain_gold"] for s in samples) / len(samples))
    for task in demo.TASKS:  # per task, from the same samples
        mine = [s["sft_gold"] for s in samples if s["task"] == task]
        assert m[f"gold_score_{task}"] == pytest.approx(sum(mine) / len(mine))
    assert 0.5 < m["demonstration_gold_score"] < 1.0  # the flawed share costs the demonstrations' own gold
    before, after = load_file(Path(pre["path"]) / "model.safetensors"), load_file(Path(e["path"]) / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # parameters changed
    tok = AutoTokenizer.from_pretrained(e["path"])
    assert tok.chat_template and tok.pad_token_id != tok.eos_token_id
    assert len(samples) == 40 and {s["task"] for s in samples} == set(demo.TASKS)


@pytest.mark.slow
def test_multirun_gives_entries_with_the_same_parent(home_with_pretrain):
    home = home_with_pretrain
    r = make("sft", home, f"-m trainer.learning_rate=1e-4,3e-4 {CI} trainer.max_steps=10 eval.num_prompts=8")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    entries = complete(home)
    assert len(entries) == 2 and len({tuple(e["parents"]) for e in entries}) == 1
    assert sorted(e["config"]["trainer"]["learning_rate"] for e in entries) == [1e-4, 3e-4]


def plain_hf_directory(path: Path) -> Path:
    """A model and tokenizer made with transformers and tokenizers alone: no pad token, no chat template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(demo.generate_corpus(300, 1), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", bos_token="</s>")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["none", "lora"])
def test_init_from_a_plain_directory(tmp_path, home, peft):
    base = plain_hf_directory(tmp_path / "base")
    r = make("sft", home, f"{CI} init_from={base} peft={peft} eval.num_prompts=8")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    [e] = complete(home)
    assert e["parents"] == []  # no registry entry behind a plain directory
    out = Path(e["path"])
    assert (out / "adapter").is_dir() == (peft == "lora")
    tuned = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id != tok.eos_token_id and tok.chat_template  # added to the plain tokenizer
    assert not any(n.startswith("base_model") or "lora" in n for n, _ in tuned.named_parameters())  # merged
    original = AutoModelForCausalLM.from_pretrained(base)
    w0 = original.model.layers[0].self_attn.q_proj.weight
    w1 = tuned.model.layers[0].self_attn.q_proj.weight
    assert w0.shape == w1.shape and not torch.allclose(w0, w1)
    assert tuned.get_input_embeddings().num_embeddings == len(tok)


@pytest.mark.slow
def test_missing_pretrain_stops_at_once_with_the_remedy(home):
    r = make("sft", home, CI)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert str(home) in out and "make pretrain" in out and "init_from=" in out
    assert "Traceback" not in out
    assert registry_entries(home) == []


BAD_ROWS = {
    "missing field": ({"messages": None, "prompt": "Hi"}, "missing field"),
    "unknown role": ({"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Yo"}]},
                     "unknown role 'robot'"),
    "empty assistant": ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
                        "empty assistant turn"),
}


def chats_with_bad_rows(tmp_path, bad: list[dict]):
    """40 demonstrations with the bad rows at rows 7, 8, ... (1-based)."""
    rows = [{"messages": r["messages"]} for r in demo.generate_demonstrations(40, 3)]
    rows[6:6] = bad
    f = tmp_path / "chats.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    return f


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows_are_named(home_with_pretrain, tmp_path, case):
    home = home_with_pretrain
    bad, expect = BAD_ROWS[case]
    r = make("sft", home, f"{CI} data=local data.path={chats_with_bad_rows(tmp_path, [bad])}")
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "row 7: " in out and expect in out, out[-1500:]
    assert "Traceback" not in out and not complete(home)


@pytest.mark.slow
def test_bad_rows_are_skipped_and_counted_when_asked(home_with_pretrain, tmp_path):
    home = home_with_pretrain
    f = chats_with_bad_rows(tmp_path, [bad for bad, _ in BAD_ROWS.values()])
    r = make("sft", home, f"{CI} data=local data.path={f} data.skip_bad_rows=true trainer.max_steps=5")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Skipped 3 bad row(s)" in r.stdout and "rows [7, 8, 9]" in r.stdout and len(complete(home)) == 1


@pytest.mark.slow
def test_plain_text_rows_train_on_every_token(home_with_pretrain, tmp_path):
    """TRL's language-modeling format, {"text": ...} rows: accepted, with the loss on every token."""
    home = home_with_pretrain
    f = tmp_path / "texts.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in demo.generate_corpus(200, 9)))
    r = make("sft", home, f"{CI} data=local data.path={f} trainer.max_steps=20")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "loss on every token" in r.stdout
    [e] = complete(home)
    assert e["metrics"]["eval_loss"] < e["metrics"]["initial_eval_loss"] and "gold_score" not in e["metrics"]


def test_plain_text_batches_carry_the_loss_on_every_token(tmp_path):
    from stages.sft import build_trainer
    tok = train_bpe(demo.generate_corpus(300, 0), 400, 128)
    rows = [{"text": t} for t in demo.generate_corpus(8, 1)]
    run = StageRun.standalone("sft", ci_config(), tmp_path)
    batch = next(iter(build_trainer(run, tiny_model(tok), tok, rows, rows[:2]).get_train_dataloader()))
    real = batch["input_ids"] != tok.pad_token_id
    assert torch.equal(batch["labels"] != -100, real)  # every real token is trained, padding is not


@pytest.mark.slow
def test_handoff_warns_when_the_tokenizer_never_saw_the_instructions(home, tmp_path):
    """A BPE trained on bare stories alone splits the instruction words; the SFT handoff check names them."""
    rng = random.Random(0)
    stories = tmp_path / "stories.jsonl"
    stories.write_text("\n".join(json.dumps({"text": demo.render_story(demo.sample_story(rng))}) for _ in range(2000)))
    # a vocabulary that holds every story word whole, as the demo's does (ci's 512 still splits some)
    r = make("pretrain", home, f"{CI} data=local data.path={stories} tokenizer.extra_text=[] tokenizer.vocab_size=1024")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = make("sft", home, f"{CI} trainer.max_steps=2 eval.num_prompts=4")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "WARNING: the tokenizer splits this stage's words" in r.stdout and "'Summarize'" in r.stdout
    assert "tokenizer.extra_text" in r.stdout
    [e] = complete(home)
    assert e["metrics"]["handoff_tokens_per_word_ratio"] > 1.25


@pytest.mark.slow
def test_no_handoff_warning_when_the_tokenizer_saw_the_instructions(home_with_pretrain):
    home = home_with_pretrain
    [pre] = complete(home, "pretrain")
    assert "demo" in pre["metrics"]["tokenizer_trained_on"]
    r = make("sft", home, f"{CI} trainer.max_steps=2 eval.num_prompts=4")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Tokenizer coverage" in r.stdout and "WARNING: the tokenizer splits" not in r.stdout
    [e] = complete(home)
    assert e["metrics"]["handoff_tokens_per_word_ratio"] < 1.25
