#!/usr/bin/env bash
# On a lent GPU: the GPU-marked tests, then training throughput of a Qwen2.5-0.5B-shaped backbone
# (random weights from its config, LoRA, bf16 weights and autocast, sdpa attention, unpadded
# batches, user prompts of 256 tokens) under DeepSpeed ZeRO-0 and ZeRO-2, one process:
# tokens/s, model-FLOP utilisation and peak memory, from the runs' metrics.jsonl.
#
#   launch/device_check.sh [--dry-run] [--steps N]
#
#   --dry-run   the same flow on the CPU with a tiny backbone and a few steps: checks this script
#   --steps N   training steps a run (default 60; the first logged window, warm-up, is left out)
# Without a CUDA device (and without --dry-run) it says so and exits 0 having checked nothing.
# Output folder: $OUT if set (the device tool collects it), else a temporary one.

set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
STEPS=60
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --steps) STEPS=$2; shift ;;
        -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "device_check: unknown flag $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export DS_ACCELERATOR=${DS_ACCELERATOR:-$([ "$DRY" = 1 ] && echo cpu || echo cuda)}

if [ "$DRY" = 0 ] && ! python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "device_check: no CUDA device visible here, nothing checked (run it on a GPU machine, or --dry-run" \
         "to try the script on the CPU)"
    exit 0
fi

if [ "$DRY" = 1 ]; then
    SHAPE='{model_type: qwen2, hidden_size: 64, intermediate_size: 224, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2}'
    DEVICE=(device=cpu train.batch_size=8 prompt.max_user_tokens=64)
    STEPS=$(( STEPS < 12 ? STEPS : 12 ))
else
    # Qwen2.5-0.5B: 24 layers of width 896, 14 query heads sharing 2 key/value heads.
    SHAPE='{model_type: qwen2, hidden_size: 896, intermediate_size: 4864, num_hidden_layers: 24, num_attention_heads: 14, num_key_value_heads: 2, max_position_embeddings: 4096}'
    DEVICE=(device=cuda train.batch_size=64 prompt.max_user_tokens=256)
    echo "== GPU tests"
    python3 -m pytest -q -m gpu tests/ || echo "device_check: GPU tests FAILED (above)"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
fi

status=0
for stage in 0 2; do
    echo "== ZeRO-$stage: $STEPS steps"
    if ! python3 -m train.cli train configs/debug.yaml "output_dir=$OUT/zero$stage" "data.dir=$OUT/data" \
            overwrite=true engine=deepspeed "deepspeed.zero_stage=$stage" "model.architecture=$SHAPE" \
            model.dtype=bfloat16 train.precision=bf16 model.attn_implementation=sdpa model.unpadded=true \
            model.tokenizer_vocab_size=4000 "train.max_steps=$STEPS" train.log_every=10 train.warmup_steps=5 \
            data.max_history=50 'data.synthetic={num_users: 4000, num_items: 2000, min_length: 40, max_length: 60}' \
            "${DEVICE[@]}" > "$OUT/zero$stage.log" 2>&1; then
        echo "device_check: ZeRO-$stage run FAILED; the end of its log:"; tail -20 "$OUT/zero$stage.log"; status=1
    fi
done

python3 - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
print("\n| engine | tokens/s (real) | padded tokens/s | model TFLOP/s | MFU | peak memory MB |")
print("| --- | --- | --- | --- | --- | --- |")
for stage in (0, 2):
    path = out / f"zero{stage}" / "metrics.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
    rows = [r for r in rows if "tokens_per_s" in r][1:]  # the first window holds the warm-up
    if not rows:
        print(f"| ZeRO-{stage} | (no steady-state rows) | | | | |")
        continue
    med = lambda key: statistics.median(r.get(key, 0.0) for r in rows)
    print(f"| ZeRO-{stage} | {med('tokens_per_s'):,.0f} | {med('padded_tokens_per_s'):,.0f} | "
          f"{med('model_tflops_per_s'):.4f} | {med('mfu'):.1%} | {max(r['peak_memory_mb'] for r in rows):,.0f} |")
PY
echo "(medians over the logged windows after the first; runs and logs in $OUT)"
exit $status
