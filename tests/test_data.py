"""Corpus loading from each file kind, clear errors for bad files, packing and the tokenizer."""
import json

import pandas as pd
import pytest

from pipeline import demo
from pipeline.config import CorpusData
from pipeline.data import load_corpus, non_padding_share, pack_into_blocks
from pipeline.errors import PipelineError
from pipeline.tokenizer import train_bpe

TEXTS = [f"Story number {i}. " + demo.generate_corpus(1, i)[0].replace("\n\n", "\n") for i in range(60)]  # one paragraph each


@pytest.fixture(scope="module")
def tok():
    return train_bpe(demo.generate_corpus(500, 0), 400, 64)


def corpus(path, **kw):
    return CorpusData(kind="file", path=str(path), **kw)


def test_text_jsonl_and_parquet_give_the_same_documents(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(TEXTS))
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)))
    parquet = tmp_path / "c.parquet"
    pd.DataFrame({"body": TEXTS}).to_parquet(parquet)
    got = [load_corpus(corpus(txt), 0, tmp_path / "cache"),
           load_corpus(corpus(jsonl), 0, tmp_path / "cache"),
           load_corpus(corpus(parquet, text_field="body"), 0, tmp_path / "cache")]
    for train, held in got:
        assert len(held) == 1 and train + held != [] and sorted(train + held) == sorted(TEXTS)


@pytest.mark.parametrize("content,match", [
    ('{"text": "ok"}\n{"text": "fine"}\n{"text": broken\n', r"line 3: not valid JSON"),
    ('{"text": "ok"}\n["a list"]\n', r"line 2: expected a JSON object"),
    ('{"text": "ok"}\n{"body": "no text"}\n', r"line 2: missing field\(s\) \['text'\]"),
    ('', "is empty"),
    ('{"text": ""}\n{"text": "  "}\n', "no text"),
])
def test_bad_jsonl_is_named_by_file_and_line(tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(PipelineError, match=match) as e:
        load_corpus(corpus(f), 0, tmp_path / "cache")
    assert "bad.jsonl" in str(e.value)


def test_missing_file_wrong_suffix_and_missing_column(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        load_corpus(corpus(tmp_path / "nope.txt"), 0, tmp_path)
    (tmp_path / "c.csv").write_text("a,b\n")
    with pytest.raises(PipelineError, match="unsupported file type"):
        load_corpus(corpus(tmp_path / "c.csv"), 0, tmp_path)
    pd.DataFrame({"body": TEXTS}).to_parquet(tmp_path / "c.parquet")
    with pytest.raises(PipelineError, match=r"missing column\(s\) \['text'\]"):
        load_corpus(corpus(tmp_path / "c.parquet"), 0, tmp_path / "cache")


def test_packing_fills_every_block_with_real_tokens(tok):
    blocks = pack_into_blocks(TEXTS, tok, 64, "test")
    ids = [t for row in blocks["input_ids"] for t in row]
    assert all(len(row) == 64 for row in blocks["input_ids"])
    assert blocks["input_ids"] == blocks["labels"]
    assert non_padding_share(blocks, tok.pad_token_id) == 1.0
    stream = [t for text in TEXTS for t in tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert ids == stream[:len(ids)] and len(stream) - len(ids) < 64 * 2  # only batch tails are dropped
    assert ids.count(tok.eos_token_id) >= len(TEXTS) - 3  # documents are separated by eos inside blocks


def test_too_little_text_for_one_block_is_refused(tok):
    with pytest.raises(PipelineError, match="shorter than one block"):
        pack_into_blocks(["Hi."], tok, 64, "tiny")


def test_tokenizer_has_what_later_stages_need(tok, tmp_path):
    assert tok.pad_token_id != tok.eos_token_id
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = demo.generate_corpus(1, 3)[0]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    out = loaded.apply_chat_template(chat, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids[-1] == loaded.eos_token_id and mask[-1] == 1  # the end of turn is the eos, and is trained
    assigned = [i for i, m in zip(ids, mask) if m]
    assert loaded.decode(assigned) == "Hello." + loaded.eos_token
    prompt = loaded.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>")
    with pytest.raises(Exception, match="unknown role"):
        loaded.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_packed_documents_see_only_themselves(tok):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    blocks = pack_into_blocks(TEXTS, tok, 64, "test")
    ids, pos = blocks[3]["input_ids"], blocks[3]["position_ids"]
    for i in range(1, 64):  # positions count from 0 again right after each eos
        assert pos[i] == (0 if ids[i - 1] == tok.eos_token_id else pos[i - 1] + 1)
    start = pos.index(0)
    end = next((i for i in range(start + 1, 64) if pos[i] == 0), 64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,  # no cache,
                                         num_attention_heads=2, intermediate_size=64, use_cache=False)).eval()  # as in training
    with torch.no_grad():
        packed = model(torch.tensor([ids]), position_ids=torch.tensor([pos])).logits[0, start:end]
        alone = model(torch.tensor([ids[start:end]])).logits[0]
        unmasked = model(torch.tensor([ids])).logits[0, start:end]
    assert torch.allclose(packed, alone, atol=1e-5)  # the document before it in the block is invisible
    assert not torch.allclose(unmasked, alone, atol=1e-3)
