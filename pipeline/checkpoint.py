"""A stage's checkpoints: the trained model saved as a plain Hugging Face directory, the trainer checkpoint a rerun
resumes from, and the plain model behind a trained (wrapped, sharded or adapted) one.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import extract_model_from_parallel
from peft import PeftModel
from torch.distributed.fsdp import FSDPModule

LOG_HISTORY = "log_history.json"  # the trainer's logged metrics, saved beside each checkpoint


def is_peft_model(model) -> bool:
    return isinstance(model, PeftModel)


def last_trainer_checkpoint(trainer_dir: Path) -> Optional[str]:
    """The newest trainer checkpoint that was written completely (a kill can leave one half-written). The Trainer
    writes trainer_state.json after everything else and removes an older checkpoint only after that, so a
    checkpoint whose trainer_state.json reads whole is complete, and a kill during a save leaves the one before. But
    with several processes each writes its own RNG state, and nothing makes the main process wait for the others
    before it writes trainer_state.json: each process's file must read whole too."""
    if not trainer_dir.is_dir():
        return None
    ckpts = sorted((p for p in trainer_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for p in ckpts:
        weights = (p / "model.safetensors").exists() or (p / "adapter_model.safetensors").exists()
        # torch.save writes a zip archive, whose directory comes last: a file cut short has none
        rng_whole = all(zipfile.is_zipfile(f) for f in p.glob("rng_state*.pth"))
        if weights and rng_whole and _reads_whole(p / "trainer_state.json"):
            return str(p)
    return None


def _reads_whole(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


def load_trainer_weights(model, ckpt: Path) -> None:
    """A Trainer checkpoint's weights (a LoRA model's adapter) into `model`, in place, as the Trainer loads them;
    only weights tied to a loaded one (which safetensors stores once) may be absent."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if is_peft_model(model):
        set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
        return
    missing, unexpected = model.load_state_dict(load_file(ckpt / "model.safetensors"), strict=False)
    untied = sorted(set(missing) - set(getattr(model, "all_tied_weights_keys", None) or {}))
    if untied or unexpected:
        raise ValueError(f"{ckpt} does not hold this model's weights: missing {untied[:5]}, unexpected "
                         f"{sorted(unexpected)[:5]}")


def save_hf_directory(trainer, tok, run, path: Optional[Path] = None) -> None:
    """The checkpoint as a plain Hugging Face directory: model, tokenizer, generation config; safetensors only.
    In the entry's directory, where the run's model is then saved; elsewhere (`path`: an ensemble's member), not.

    A LoRA run keeps its adapter in adapter/ beside the merged model, which transformers loads alone.
    """
    path = Path(path or run.entry.path)
    if not is_peft_model(trainer.model):
        trainer.save_model(str(path))
        if run.is_main:
            (path / "training_args.bin").unlink(missing_ok=True)  # a pickle; the config is YAML
    elif run.is_main:
        trainer.model.save_pretrained(path / "adapter")
        trainer.model = trainer.model.merge_and_unload()  # merging changes the layers in place: keep the result
        trainer.model.save_pretrained(path)
    if run.is_main:
        tok.save_pretrained(path)
        # the logged training curve, for the run report (trainer checkpoints are removed on completion)
        (path / LOG_HISTORY).write_text(json.dumps(trainer.state.log_history))
    run.state.wait_for_everyone()
    run.saved = path == Path(run.entry.path)


def unwrapped(model, run=None):
    """The plain transformers model of a trained model, for the main process to evaluate alone: LoRA adapters
    merged in, and the forward without the mixed-precision autocast accelerate wraps it in, so that evaluation
    runs in fp32 as before training. A model sharded across the processes (FSDP) cannot run on one of them: the
    checkpoint its run saved, gathered whole, is loaded instead."""
    model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    if isinstance(model, FSDPModule):
        if run is None:
            raise ValueError("a model sharded with FSDP is evaluated from its run's saved checkpoint: pass the run")
        plain = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # fully_shard's subclass
        return plain.from_pretrained(run.entry.path, dtype=torch.float32).to(run.state.device)
    return model.merge_and_unload() if is_peft_model(model) else model
