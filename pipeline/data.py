"""Data for the stages: reading local files and hub datasets with clear errors, and packing a corpus.

Local `.jsonl` files are checked line by line first, so that a malformed row is reported with its file
and line number instead of a parser traceback.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
from datasets import Dataset

from pipeline import demo
from pipeline.config import CorpusConfig
from pipeline.errors import PipelineError

FILE_KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def check_jsonl(path: Path, required: tuple[str, ...]) -> None:
    """Raise PipelineError naming the first line that is not a JSON object with the required fields."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PipelineError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}). "
                                    f"Each line must be one JSON object.") from None
            if not isinstance(row, dict):
                raise PipelineError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise PipelineError(f"{path}, line {n}: missing field(s) {missing}; found {sorted(row)}")


def load_table(path: str, required: tuple[str, ...], cache_dir: Path, *, sample_by: str = "paragraph",
               split: str = "train", hub_config: str | None = None, hub: bool = False) -> Dataset:
    """Rows of a local .txt/.jsonl/.parquet file, or of a hub dataset, with the required columns checked."""
    if hub:
        try:
            ds = datasets.load_dataset(path, hub_config, split=split, cache_dir=str(cache_dir))
        except Exception as e:  # the hub's errors (no network, no such dataset) are the user's to fix
            raise PipelineError(f"cannot load hub dataset '{path}' (split {split}): {e}") from None
        where = f"hub dataset '{path}'"
    else:
        file = Path(path)
        if not file.is_file():
            raise PipelineError(f"data file not found: {file.resolve()}")
        if file.stat().st_size == 0:
            raise PipelineError(f"{file} is empty: no text to train on")
        kind = FILE_KINDS.get(file.suffix)
        if kind is None:
            raise PipelineError(f"{file}: unsupported file type '{file.suffix}'; use one of {sorted(FILE_KINDS)}")
        if kind == "json":
            check_jsonl(file, required)
        extra = {"sample_by": sample_by} if kind == "text" else {}
        try:
            ds = datasets.load_dataset(kind, data_files=str(file), split="train", cache_dir=str(cache_dir), **extra)
        except Exception as e:
            raise PipelineError(f"{file}: cannot be read as {kind}: {e}") from None
        where = str(file)
    missing = [k for k in required if k not in ds.column_names]
    if missing:
        raise PipelineError(f"{where}: missing column(s) {missing}; found {ds.column_names}. "
                            f"Rename the column or set the field name in the data config.")
    if len(ds) == 0:
        raise PipelineError(f"{where} is empty: no rows to train on")
    return ds


def load_corpus(cfg: CorpusConfig, seed: int, cache_dir: Path) -> tuple[list[str], list[str]]:
    """(train documents, eval documents) of a text corpus."""
    if cfg.kind == "demo":
        docs = demo.generate_corpus(cfg.num_documents, seed)
    else:
        field = "text" if Path(str(cfg.path)).suffix == ".txt" else cfg.text_field
        ds = load_table(cfg.path, (field,), cache_dir, sample_by=cfg.sample_by, split=cfg.split,
                        hub_config=cfg.hub_config, hub=cfg.kind == "hub")
        if cfg.max_documents:
            ds = ds.select(range(min(cfg.max_documents, len(ds))))
        docs = [t.strip() for t in ds[field] if isinstance(t, str) and t.strip()]
    if not docs:
        raise PipelineError(f"the corpus ({cfg.path or 'demo'}) has no text: every document is empty")
    n_eval = max(1, int(len(docs) * cfg.eval_fraction))
    if len(docs) - n_eval < 1:
        raise PipelineError(f"the corpus ({cfg.path}) has {len(docs)} document(s): too few to hold some out "
                            f"for evaluation")
    return docs[n_eval:], docs[:n_eval]


def fingerprint(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def pack_into_blocks(texts: list[str], tokenizer, block_size: int, desc: str) -> Dataset:
    """Tokenize documents, join them with EOS and cut the stream into full blocks: no padding anywhere."""
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        return {"ids": [ids + [eos] for ids in tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]]}

    def group(batch):
        stream = [t for ids in batch["ids"] for t in ids]
        n = len(stream) // block_size * block_size  # the last partial block of each batch is dropped
        blocks = [stream[i:i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    ds = Dataset.from_dict({"text": texts})
    ds = ds.map(tokenize, batched=True, remove_columns=["text"], desc=f"Tokenizing {desc}")
    ds = ds.map(group, batched=True, batch_size=1000, remove_columns=["ids"], desc=f"Packing {desc}")
    if len(ds) == 0:
        raise PipelineError(f"the {desc} text is shorter than one block of {block_size} tokens; "
                            f"add text or lower data.block_size")
    return ds


def non_padding_share(blocks: Dataset, pad_token_id: int) -> float:
    """Share of tokens in the training blocks that are not padding."""
    total = pad = 0
    for ids in blocks.with_format("numpy")["input_ids"]:
        total += ids.size
        pad += int((ids == pad_token_id).sum())
    return 1.0 - pad / total
