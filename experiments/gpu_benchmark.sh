#!/usr/bin/env bash
# Training throughput and MFU of 125M, 350M and 1B decoder-only Transformers on one GPU.
#
#     bash experiments/gpu_benchmark.sh                 # JSON to $OUT/gpu_benchmark.json (or /tmp)
#     bash experiments/gpu_benchmark.sh --rounds=3      # any experiments/benchmark.py flag
#
# The size table's base, large and 1b rows (12x768, 24x1024, 24x2048; d_ff 4x; GELU),
# sequence 2048 of bytes, batch 16 / 16 / 8, bfloat16 compute (float32 parameters and
# AdamW state), layers scanned, attention through `jax.nn.dot_product_attention` with a
# structural causal mask (cuDNN flash attention where it applies). MFU is printed against
# the same run's bfloat16 matmul ceiling and the datasheet's dense bfloat16 peak
# (`accounting.PEAK_FLOPS`). Sized to finish in under 8 minutes on one H200 (each config
# in its own process: compile ~0.5-1 min, 5 rounds of 5 steps); `timeout` enforces it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 - <<'PY'
import sys
import jax
device = jax.devices()[0]
if device.platform != 'gpu':
    sys.exit(f"no GPU visible to JAX ({device.platform}); install jax with CUDA (pip install -U 'jax[cuda12]')")
print(f'{jax.device_count()} x {device.device_kind}, jax {jax.__version__}', flush=True)
PY
out="${OUT:-/tmp}/gpu_benchmark.json"
timeout 470 python3 experiments/benchmark.py --configs=gpu125m,gpu350m,gpu1b --rounds=5 --steps=5 \
    --no_torch --hugepages=0 --out="$out" "$@"
echo "JSON: $out"
