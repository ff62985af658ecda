#!/usr/bin/env bash
# GPU throughput check: the llama-125m preset (conf/model/llama-125m.yaml, 32k vocabulary) trained in bf16
# for a few hundred steps; prints tokens/s and MFU against this GPU's measured bf16 matmul peak.
#
#   bash bench/gpu.sh [STEPS=300] [BATCH=16] [SEQ=1024]
#
# Needs only what a GPU machine already has: python3 with a CUDA build of torch. transformers is used
# when importable; otherwise the wheels in bench/wheels/ (if brought along) are installed without network
# (`pip download transformers tokenizers safetensors huggingface_hub -d bench/wheels` on a networked
# machine). No data or model is downloaded: the model is built from its config, the tokens are random
# (throughput does not depend on them).
#   bash bench/gpu.sh demo      # instead: the whole demo pipeline at a GPU's budget (experiment=demo-gpu),
#                                 in a fresh registry under runs-gpu/, then its report; needs `make install
#                                 TORCH=torch` done (the packages come from the registries)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ${1:-} == demo ]]; then
  export PIPELINE_HOME=${PIPELINE_HOME:-runs-gpu} WANDB_MODE=${WANDB_MODE:-offline}
  exec make all ARGS="experiment=demo-gpu"
fi
PY=${PYTHON:-python3}
if ! $PY -c "import transformers" 2>/dev/null; then
  if ls bench/wheels/*.whl >/dev/null 2>&1; then
    $PY -m pip install --quiet --no-index --find-links bench/wheels transformers
  else
    echo "transformers is not installed and bench/wheels/ holds no wheels" >&2; exit 1
  fi
fi
STEPS=${1:-300} BATCH=${2:-16} SEQ=${3:-1024} $PY - <<'EOF'
import os, time, torch
from transformers import LlamaConfig, LlamaForCausalLM

assert torch.cuda.is_available(), "no CUDA device"
steps, batch, seq = int(os.environ["STEPS"]), int(os.environ["BATCH"]), int(os.environ["SEQ"])
dev = torch.device("cuda")
name = torch.cuda.get_device_name()

# bf16 matmul peak, measured
n = 8192
a, b = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)
for _ in range(3):
    a @ b
torch.cuda.synchronize()
reps, start = 50, time.perf_counter()
for _ in range(reps):
    a @ b
torch.cuda.synchronize()
peak = 2 * n ** 3 * reps / (time.perf_counter() - start)
del a, b

# the llama-125m preset, as the pretraining stage builds it, trained in bf16 autocast with fused AdamW
cfg = LlamaConfig(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=12, intermediate_size=2048, max_position_embeddings=seq,
                  tie_word_embeddings=False, attn_implementation="sdpa")
model = LlamaForCausalLM(cfg).to(dev)
params = sum(p.numel() for p in model.parameters())
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
data = torch.randint(0, cfg.vocab_size, (8, batch, seq), device=dev)
warm = 10
for step in range(steps + warm):
    if step == warm:
        torch.cuda.synchronize(); start = time.perf_counter()
    x = data[step % 8]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
torch.cuda.synchronize()
elapsed = time.perf_counter() - start
tokens_per_s = steps * batch * seq / elapsed
flops_per_token = 6 * params + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq
print(f"device               {name}")
print(f"torch                {torch.__version__}")
print(f"model                llama-125m preset, {params / 1e6:.1f}M parameters, bf16 autocast, sdpa")
print(f"batch x seq          {batch} x {seq}, {steps} steps after {warm} warm-up")
print(f"bf16 matmul peak     {peak / 1e12:.1f} TFLOP/s (measured, {n}x{n})")
print(f"tokens/s             {tokens_per_s:,.0f}")
print(f"MFU                  {tokens_per_s * flops_per_token / peak:.3f}")
print(f"peak memory          {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
EOF
