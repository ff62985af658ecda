"""The pretraining stage against a bare PyTorch loop, interleaved in one process so that the machine's drift cancels.

The stage runs as `make pretrain` runs it (run_stage, its Trainer, data, collator, callbacks and optimizer); a
callback stops it every `segment` steps and runs the same number of bare-loop steps on a model of the same config.
Each pair of segments (stage, then bare loop) is a few seconds apart, so a machine whose speed drifts by a third
over an hour runs both at the same speed; the ratio is the total over all segments and its 95% interval a
bootstrap over the segment pairs.

    python -m bench.pretrain_vs_bare [hydra overrides]   # prints the ratio; make bench records it in bench.json
    python -m bench.pretrain_vs_bare --profile DIR [...] # and each side's whole operator table
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainerCallback, get_scheduler

from pipeline.evaluation import bootstrap_interval

ROOT = Path(__file__).resolve().parent.parent
DOC_TOKENS = 100  # the bare loop's documents: about the demo corpus's mean length in tokens
WARMUP_STEPS = 5  # stage steps before the first segment (allocations, first calls), not counted
SEGMENTS = 12     # segment pairs; the interval narrows as their count grows
SEGMENT_STEPS = 10


class BareLoop:
    """The stage's model (fresh, from its config), batch, sequence length, document-masked attention (position ids
    restarting every DOC_TOKENS), optimizer (Muon with AdamW, or fused AdamW), schedule, clipping and precision
    (fp32 weights, bf16 autocast where the stage uses it), in a plain PyTorch loop on ready tensors."""

    def __init__(self, model_config, cfg, precision: str, total_steps: int, device: torch.device):
        from pipeline.optim import MuonWithAdamW
        from pipeline.trainer import scheduler_settings

        t, block, batch = cfg.trainer, cfg.data.block_size, cfg.trainer.per_device_train_batch_size
        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32).to(device)
        self.model.train()
        if cfg.optimizer == "muon":
            self.opt = MuonWithAdamW(self.model, lr=t.learning_rate, weight_decay=t.weight_decay)
        else:
            params = list(self.model.parameters())
            groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": t.weight_decay},
                      {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
            self.opt = torch.optim.AdamW(groups, lr=t.learning_rate, fused=True)
        settings = scheduler_settings(t.lr_scheduler_type, dict(t.lr_scheduler_kwargs or {}))
        self.sched = get_scheduler(t.lr_scheduler_type, self.opt, t.warmup_steps, total_steps,
                                   scheduler_specific_kwargs=settings)
        self.batches = torch.randint(0, model_config.vocab_size, (8, batch, block), device=device)
        self.positions = (torch.arange(block, device=device) % DOC_TOKENS).expand(batch, block)
        self.max_grad_norm, self.bf16, self.device = t.max_grad_norm, precision == "bf16", device
        self.done = 0

    def run(self, steps: int) -> float:
        """`steps` training steps; their seconds."""
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            x = self.batches[self.done % len(self.batches)]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.model(input_ids=x, position_ids=self.positions, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            self.done += 1
        synchronize(self.device)
        return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    """Wait for a GPU's queued work, so that a segment's seconds hold all of its steps (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Interleave(TrainerCallback):
    """After WARMUP_STEPS stage steps, every `segment` stage steps: the stage segment's seconds (every step's work,
    the Trainer's data loading, logging and callbacks included), then `segment` bare-loop steps and theirs. One
    more pair after the measured ones runs under torch.profiler: each side's time per step in each operator, and
    outside them (Python: the Trainer, the data, the callbacks; the bare loop's few lines)."""

    def __init__(self, run, precision: str, segments: int, segment: int, profile_dir: Path | None = None):
        self.run, self.precision, self.segments, self.segment = run, precision, segments, segment
        self.profile_dir = profile_dir
        self.stage_s: list[float] = []
        self.bare_s: list[float] = []
        self.ops: dict[str, dict[str, float]] = {}  # side -> operator -> self seconds a step, under the profiler
        self.outside_ops: dict[str, float] = {}      # side -> seconds a step outside every operator
        self.bare = None
        self.device = torch.device("cpu")
        self.started = 0.0
        self.profiler = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.device = next(model.parameters()).device
        self.bare = BareLoop(model.config, self.run.cfg, self.precision, args.max_steps, self.device)
        self.bare.run(WARMUP_STEPS)

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        now = time.perf_counter()
        done = state.global_step - WARMUP_STEPS
        if done < 0 or done % self.segment or done > (self.segments + 1) * self.segment:
            return
        if done and self.profiler is None:  # a measured stage segment ended: as many bare-loop steps
            self.stage_s.append(now - self.started)
            self.bare_s.append(self.bare.run(self.segment))
        elif done:  # the profiled pair
            self._profiled("stage", now - self.started)
            self._start_profiler()
            self._profiled("bare", self.bare.run(self.segment))
            return
        if len(self.stage_s) == self.segments:
            self._start_profiler()
        self.started = time.perf_counter()

    def _start_profiler(self) -> None:
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self.profiler.__enter__()

    def _profiled(self, side: str, seconds: float) -> None:
        p, self.profiler = self.profiler, None
        p.__exit__(None, None, None)
        events = p.key_averages()
        self.ops[side] = {e.key: e.self_cpu_time_total / 1e6 / self.segment for e in events}
        self.outside_ops[side] = seconds / self.segment - sum(self.ops[side].values())
        if self.profile_dir is not None:
            Path(self.profile_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.profile_dir) / f"{side}.txt").write_text(
                events.table(sort_by="self_cpu_time_total", row_limit=40))

    def gap(self, top: int = 8) -> list[dict]:
        """The operators whose time a step differs most between the stage and the bare loop (ms)."""
        stage, bare = self.ops["stage"], self.ops["bare"]
        rows = [{"op": k, "stage_ms": 1e3 * stage.get(k, 0.0), "bare_ms": 1e3 * bare.get(k, 0.0)}
                for k in set(stage) | set(bare)]
        rows.append({"op": "(outside operators)", "stage_ms": 1e3 * self.outside_ops["stage"],
                     "bare_ms": 1e3 * self.outside_ops["bare"]})
        return sorted(rows, key=lambda r: -abs(r["stage_ms"] - r["bare_ms"]))[:top]


def interval(stage_s: list[float], bare_s: list[float]) -> tuple[float, float]:
    """95% bootstrap interval of sum(bare) / sum(stage) over the segment pairs."""
    import numpy as np

    stage, bare = np.asarray(stage_s), np.asarray(bare_s)
    return bootstrap_interval(lambda picks: bare[picks].sum(axis=1) / stage[picks].sum(axis=1), len(stage))


def measure(root: Path, overrides: list[str], segments: int = SEGMENTS, segment: int = SEGMENT_STEPS,
            profile_dir: Path | None = None) -> dict:
    """Run the pretraining stage into the registry at root with the bare loop interleaved; the stage's entry (as
    bench.run's make_stage gives it) and the figures."""
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_schemas
    from pipeline.registry import Registry
    from pipeline.run import run_stage
    from pipeline.trainer import resolved_precision
    from stages.pretrain import inputs, pretrain

    register_schemas()
    steps = WARMUP_STEPS + (segments + 1) * segment  # warm-up, the measured segments and the profiled one
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("pretrain", overrides=[f"registry.root={root}", "logging=none", *overrides,
                                             f"trainer.max_steps={steps}", f"trainer.save_steps={steps}",
                                             "resume=never"])
    precision = resolved_precision(cfg.trainer.mixed_precision, "pretrain")
    interleave = None

    def body(run):
        nonlocal interleave
        interleave = Interleave(run, precision, segments, segment, profile_dir)
        run.callbacks.append(interleave)
        return pretrain(run)

    torch.set_float32_matmul_precision("high")  # as stages.pretrain's main
    run_stage("pretrain", cfg, body, inputs)
    entry = Registry(root).resolve("pretrain:latest").entry
    tokens = cfg.trainer.per_device_train_batch_size * cfg.data.block_size * segment
    stage_s, bare_s = interleave.stage_s, interleave.bare_s
    low, high = interval(stage_s, bare_s)
    return {"entry": {"id": entry.id, "path": entry.path, "config": entry.config, "metrics": entry.metrics},
            "pretrain_tokens_per_s": tokens * len(stage_s) / sum(stage_s),
            "bare_loop_tokens_per_s": tokens * len(bare_s) / sum(bare_s),
            "pretrain_vs_bare_ratio": sum(bare_s) / sum(stage_s),
            "pretrain_vs_bare_ci_low": low, "pretrain_vs_bare_ci_high": high,
            "pretrain_vs_bare_segments": [{"stage_s": s, "bare_s": b} for s, b in zip(stage_s, bare_s)],
            "pretrain_vs_bare_gap_ms": interleave.gap(),
            "pretrain_precision": precision}


def main() -> None:
    from pipeline.registry import default_root

    argv, profile_dir = sys.argv[1:], None
    if "--profile" in argv:
        i = argv.index("--profile")
        profile_dir, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
    root = Path(default_root()).resolve() / "bench"
    out = measure(root, argv, profile_dir=profile_dir)
    for s in out["pretrain_vs_bare_segments"]:
        print(f"  stage {s['stage_s']:.3f} s, bare loop {s['bare_s']:.3f} s, ratio {s['bare_s'] / s['stage_s']:.3f}")
    print(f"pretraining stage {out['pretrain_tokens_per_s']:.0f} tokens/s, "
          f"bare loop {out['bare_loop_tokens_per_s']:.0f} tokens/s ({out['pretrain_precision']}): "
          f"ratio {out['pretrain_vs_bare_ratio']:.3f} "
          f"[{out['pretrain_vs_bare_ci_low']:.3f}, {out['pretrain_vs_bare_ci_high']:.3f}]")
    print(gap_table(out["pretrain_vs_bare_gap_ms"]))
    if profile_dir:
        print(f"operator tables: {profile_dir}/stage.txt, {profile_dir}/bare.txt")


def gap_table(rows: list[dict]) -> str:
    """Where a stage step's time differs from a bare-loop step's, under torch.profiler."""
    lines = [f"  {'ms a step, under torch.profiler':48s} {'stage':>8s} {'bare':>8s} {'stage - bare':>13s}"]
    lines += [f"  {r['op'][:48]:48s} {r['stage_ms']:8.2f} {r['bare_ms']:8.2f} {r['stage_ms'] - r['bare_ms']:+13.2f}"
              for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
