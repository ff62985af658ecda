"""The pretraining stage through its real command (`make pretrain`), at micro sizes."""
import json
import os

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import demo
from pipeline.checkpoint import unwrapped
from pipeline.trainer import resolved_precision
from tests.conftest import make, registry_entries

CI = "experiment=ci"


def complete(home, stage="pretrain"):
    return [e for e in registry_entries(home, stage) if e["status"] == "complete"]


@pytest.mark.slow
def test_pretrain_learns_and_registers_a_loadable_checkpoint(home):
    r = make("pretrain", home, CI)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    [e] = complete(home)
    m = e["metrics"]
    assert m["eval_loss"] < 0.8 * m["initial_eval_loss"]  # it learned
    assert m["perplexity"] == pytest.approx(torch.exp(torch.tensor(m["eval_loss"])).item(), rel=1e-4)
    assert m["packing_efficiency"] >= 0.99
    kinds = {k.split("/")[1] for k in m if k.startswith("copy_rate/")}  # those the held-out stories mention again
    assert "person" in kinds and kinds <= {"person", "animal", "colour", "obj", "place"}
    assert e["parents"] == [] and e["config"]["trainer"]["max_steps"] == 40
    assert e["data_fingerprint"] and e["tokenizer_fingerprint"] and e["versions"]["trl"] == "1.12.0"
    path = e["path"]
    assert path.startswith(str(home))
    assert json.load(open(os.path.join(path, "manifest.json")))["status"] == "complete"
    assert os.path.exists(os.path.join(path, "pipeline_config.yaml"))
    assert os.path.exists(os.path.join(path, "model.safetensors"))
    assert not any(f.endswith((".bin", ".pt")) for f in os.listdir(path))
    assert not os.path.exists(os.path.join(path, "trainer"))  # trainer checkpoints are cleaned up
    # transformers alone loads it and generates
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert tok.pad_token_id != tok.eos_token_id and tok.chat_template
    assert model.generation_config.eos_token_id == tok.eos_token_id
    x = tok("Once upon a time", return_tensors="pt")
    y = model.generate(**x, max_new_tokens=8, do_sample=False)
    assert y.shape[1] > x["input_ids"].shape[1]
    assert f"Complete: {e['id']}" in r.stdout and "non-padding share 1.0000" in r.stdout
    # the stage's output is also in Hydra's log of the run, beside the composed config
    [log] = (home / "hydra" / "pretrain").glob("*/pretrain.log")
    assert f"Complete: {e['id']}" in log.read_text() and (log.parent / ".hydra" / "config.yaml").exists()


@pytest.mark.slow
def test_own_text_trains(home, tmp_path):
    """A corpus of the user's own (a .parquet here; test_data.py checks each file kind gives the same documents)."""
    texts = demo.generate_corpus(300, 9)
    f = tmp_path / "c.parquet"
    pd.DataFrame({"text": texts}).to_parquet(f)
    r = make("pretrain", home, f"{CI} data=local data.path={f} trainer.max_steps=10")
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-1500:]
    [e] = complete(home)
    assert e["config"]["data"]["path"] == str(f) and e["metrics"]["eval_loss"] < e["metrics"]["initial_eval_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("args,expect", [
    ("no_such_key=1", "no_such_key"),
    ("trainer.max_steps=many", "max_steps"),
    ("data=local data.path=/no/such/corpus.jsonl", "data file not found: /no/such/corpus.jsonl"),
    ("data=local data.path={bad}", "bad.jsonl, line 3"),
    ("data=local data.path={empty}", "empty.txt is empty"),
    ("model=hub", "missing value for model.name_or_path"),
])
def test_bad_input_is_refused_clearly(home, tmp_path, args, expect):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine line"}\n{"text": "another"}\n{"text": broken\n{"text": "last"}\n')
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = make("pretrain", home, f"{CI} " + args.format(bad=bad, empty=empty))
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert expect in out
    assert "Traceback" not in out
    assert not complete(home)


@pytest.mark.slow
def test_two_processes_make_one_entry(home):
    r = make("pretrain", home, CI, NPROC=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    entries = registry_entries(home)
    assert len(entries) == 1 and entries[0]["status"] == "complete"
    assert entries[0]["metrics"]["eval_loss"] < entries[0]["metrics"]["initial_eval_loss"]


@pytest.mark.parametrize("cuda, cuda_bf16, amx, avx512_bf16, stage, expect", [
    (False, False, True, False, "sft", "bf16"), (False, False, False, True, "pretrain", "bf16"),
    (False, False, False, True, "sft", "no"), (False, False, False, True, "ppo", "no"),
    (False, False, False, False, "pretrain", "no"), (True, True, False, False, "grpo", "bf16"),
    (True, True, False, False, "ppo", "no"), (False, False, True, False, "ppo", "no"),
    (True, False, True, True, "pretrain", "no")])
def test_auto_precision_is_bf16_only_where_it_is_fast(monkeypatch, cuda, cuda_bf16, amx, avx512_bf16, stage, expect):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: cuda_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert resolved_precision("auto", stage) == expect
    assert resolved_precision("no", stage) == "no"
    assert resolved_precision("bf16", stage) == ("no" if stage == "ppo" else "bf16")  # TRL's PPO: fp32 always


def test_evaluation_after_mixed_precision_training_runs_in_fp32():
    """accelerate wraps a bf16 run's forward in autocast; the model the stages evaluate must be fp32 again."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                                       pad_token_id=0))
    x = torch.randint(1, 64, (2, 12))
    fp32 = model(input_ids=x).logits
    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier test's trainer in this process set its own
    try:
        prepared = Accelerator(cpu=True, mixed_precision="bf16").prepare(model)
        assert not torch.equal(prepared(input_ids=x).logits, fp32)  # the training forward runs in bf16
        assert torch.equal(unwrapped(prepared)(input_ids=x).logits, fp32)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # the next test's trainer sets its own


@pytest.mark.slow
def test_extra_text_from_a_file_gives_its_words_their_own_tokens(home, tmp_path):
    """tokenizer.extra_text: the words of a fine-tuning file become tokens, and the entry says what the BPE saw."""
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"Photosynthesize the quokka number {i}."},
        {"role": "assistant", "content": "Photosynthesizing quokkas is impossible."}]}) for i in range(300)))
    # room beyond the stories' own words, which fill the ci BPE's size on their own
    r = make("pretrain", home, f"{CI} tokenizer.extra_text=[{chats}] trainer.max_steps=2 tokenizer.vocab_size=1024")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    [e] = complete(home)
    assert f"600 texts of {chats}" in e["metrics"]["tokenizer_trained_on"]
    assert "demo" not in e["metrics"]["tokenizer_trained_on"]  # an explicit list replaces the demo's default
    tok = AutoTokenizer.from_pretrained(e["path"])
    assert tok.tokenize(" quokka") == ["Ġquokka"]  # a word the stories never use
