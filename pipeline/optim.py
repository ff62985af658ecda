"""The pretraining optimizer: the Trainer's fused AdamW, or Muon for the hidden layers' weight matrices with AdamW
for everything else (embeddings, output layer, norms), as the modded-nanogpt speedrun trains.

    make pretrain ARGS="optimizer=muon"

Muon runs with torch's "match_rms_adamw" learning-rate adjustment (Moonshot's "Muon is Scalable for LLM
Training"): its updates have AdamW's RMS, so the same learning rate, schedule and weight decay serve both.

torch's Muon runs its Newton-Schulz iteration in bf16. A CPU without native bf16 matrix products (AVX2 alone: no
AVX-512 BF16 or AMX) emulates them far slower than fp32, and the iteration then costs more than the forward and
backward passes together; there the same update runs in fp32 (`Fp32Muon`; docs/results.md, "Muon's Newton-Schulz
iteration in fp32").
"""
from __future__ import annotations

import torch
from torch.optim._muon import _adjust_lr

from pipeline.errors import PipelineError


def muon_split(model) -> tuple[list, list, list]:
    """(Muon's matrices, AdamW's matrices, AdamW's vectors): Muon takes the 2-D weights of the hidden layers; the
    embeddings and the output layer (lookups and a classifier, not linear maps between hidden states) and the
    1-D parameters stay with AdamW, which decays only the matrices."""
    lookups = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    muon, adam_decay, adam_no_decay = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            adam_no_decay.append(p)
        elif id(p) in lookups:
            adam_decay.append(p)
        else:
            muon.append(p)
    return muon, adam_decay, adam_no_decay


def _newton_schulz_fp32(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float):
    """torch's quintic Newton-Schulz orthogonalisation (torch.optim._muon), in fp32."""
    a, b, c = coefficients
    x = g.float() if g.size(0) <= g.size(1) else g.float().T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if g.size(0) <= g.size(1) else x.T


class Fp32Muon(torch.optim.Muon):
    """torch.optim.Muon's update, state and learning-rate adjustment, with the Newton-Schulz iteration in fp32."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            for p, g, buf in zip(params, grads, bufs):
                buf.lerp_(g, 1 - group["momentum"])
                update = g.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = _newton_schulz_fp32(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape))
        return loss


def native_bf16_matmul(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively on the device: any GPU torch trains on, a CPU with AVX-512 BF16/AMX."""
    return device.type != "cpu" or torch.ops.mkldnn._is_mkldnn_bf16_supported()


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon and a fused torch.optim.AdamW as one optimizer, for the Trainer: its param groups are the
    two inner optimizers' own (the learning-rate schedule reaches both), its state dict holds both."""

    def __init__(self, model, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
        muon, decay, no_decay = muon_split(model)
        muon_cls = torch.optim.Muon if not muon or native_bf16_matmul(muon[0].device) else Fp32Muon
        self.muon = muon_cls(muon, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        self.adam = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps,
                                      fused=all(p.device.type in ("cpu", "cuda") for p in decay + no_decay))
        super().__init__(self.muon.param_groups + self.adam.param_groups, {})  # the same group dicts

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.muon.step()
        self.adam.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adam.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adam": self.adam.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adam.load_state_dict(state_dict["adam"])
        # loading gives the inner optimizers new group dicts (accelerate loads once when it prepares the optimizer):
        # share them again, or the learning-rate schedule would set groups that no longer train anything
        self.param_groups = self.muon.param_groups + self.adam.param_groups


class MuonFactory:
    """What the Trainer calls to build the optimizer (`optimizer_cls_and_kwargs`): with the model, once prepared."""

    def __call__(self, model, **kwargs) -> MuonWithAdamW:
        return MuonWithAdamW(model, **kwargs)


def trainer_optimizer(name: str, args, distributed_type=None) -> tuple | None:
    """The Trainer's `optimizer_cls_and_kwargs` for the optimizer setting (None: the Trainer's own fused AdamW).
    Muon needs each process to hold whole weight matrices: one process, or DDP."""
    from accelerate.utils import DistributedType

    if name == "adamw":
        return None
    if distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise PipelineError(f"optimizer=muon orthogonalises whole weight matrices, which {distributed_type.value} "
                            f"shards across the processes: pretrain with optimizer=adamw under it (or with muon on "
                            f"one process or DDP)")
    return MuonFactory, {"lr": args.learning_rate, "weight_decay": args.weight_decay,
                         "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
