"""optimizer=muon: Muon on the hidden matrices, AdamW on the rest, as one optimizer the Trainer schedules, saves
and resumes."""
import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator

from pipeline.config import PretrainStageConfig
from pipeline.optim import Fp32Muon, MuonWithAdamW, muon_split, trainer_optimizer


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=4, intermediate_size=64, max_position_embeddings=32))


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = tiny_llama()
    muon, decay, no_decay = muon_split(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay} == {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(p.ndim == 1 for p in no_decay) and len(no_decay) == 2 * 2 + 1  # two norms per layer, the final one
    assert all("layers" in names[id(p)] and p.ndim == 2 for p in muon) and len(muon) == 2 * 7
    assert len(muon) + len(decay) + len(no_decay) == len(list(model.parameters()))


def test_one_step_moves_both_kinds_of_weight_and_the_schedule_reaches_both():
    model = tiny_llama()
    opt = MuonWithAdamW(model, lr=1e-2, weight_decay=0.0)
    opt.load_state_dict(opt.state_dict())  # as accelerate does when it prepares the optimizer
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert {g["lr"] for g in opt.muon.param_groups + opt.adam.param_groups} == {5e-3}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 64, (4, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "model.layers.0.self_attn.q_proj.weight" in moved and "model.embed_tokens.weight" in moved
    assert "model.norm.weight" in moved
    assert opt.muon.state and opt.adam.state


def test_fp32_muon_takes_torchs_muon_step_without_bf16(monkeypatch):
    """The fp32 iteration is torch's update to within bf16 rounding."""
    torch.manual_seed(0)
    weights = [torch.randn(48, 32), torch.randn(32, 80)]  # both orientations: tall and wide
    grads = [torch.randn_like(w) for w in weights]
    steps = {}
    for cls in (torch.optim.Muon, Fp32Muon):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = cls(params, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
        for _ in range(2):  # the second step reads the momentum buffer the first one left
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        steps[cls] = [p.detach() - w for p, w in zip(params, weights)]
    for ours, torchs in zip(steps[Fp32Muon], steps[torch.optim.Muon]):
        assert torch.allclose(ours, torchs, rtol=0.05, atol=0.05 * torchs.abs().mean().item())
        assert not torch.equal(ours, torchs)  # and it did not run torch's bf16 iteration
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert type(MuonWithAdamW(tiny_llama(), lr=1e-2, weight_decay=0.0).muon) is Fp32Muon
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert type(MuonWithAdamW(tiny_llama(), lr=1e-2, weight_decay=0.0).muon) is torch.optim.Muon


def test_the_trainer_resumes_muon_where_it_stopped(tmp_path):
    data = Dataset.from_dict({"input_ids": torch.randint(0, 64, (48, 16)).tolist()})
    data = data.map(lambda r: {"labels": r["input_ids"]})

    def train(out, steps, resume=None):
        model = tiny_llama()
        args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                                 save_steps=3, save_strategy="steps", report_to="none", use_cpu=True, seed=0,
                                 lr_scheduler_type="cosine", logging_steps=100, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                          optimizer_cls_and_kwargs=trainer_optimizer("muon", args))
        trainer.train(resume_from_checkpoint=resume)
        inner = trainer.optimizer.optimizer
        assert isinstance(inner, MuonWithAdamW)
        # the cosine schedule reached the optimizers that train: at its last step the rate is near zero
        assert {g["lr"] for g in inner.muon.param_groups + inner.adam.param_groups} == {trainer.lr_scheduler.get_last_lr()[0]}
        assert trainer.lr_scheduler.get_last_lr()[0] < 1e-3
        return model

    whole = train(tmp_path / "whole", 6)  # its checkpoint at step 3 is where the second run resumes
    resumed = train(tmp_path / "resumed", 6, resume=str(tmp_path / "whole" / "checkpoint-3"))
    for (n, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_muon_is_refused_where_the_matrices_are_sharded():
    from accelerate.utils import DistributedType

    from pipeline.errors import PipelineError

    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    assert trainer_optimizer("muon", args, DistributedType.MULTI_CPU) is not None  # DDP: whole matrices everywhere
    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(PipelineError, match="optimizer=adamw"):
            trainer_optimizer("muon", args, sharded)


def test_only_known_optimizers_are_accepted():
    assert trainer_optimizer("adamw", None) is None
    with pytest.raises(ValueError, match="optimizer must be one of adamw, muon"):
        PretrainStageConfig(optimizer="sgd")
