#!/usr/bin/env bash
# The accelerator round of bench/README.md, prepared for short loans of one GPU
# (minutes, compilation included): FLOP utilisation at T5 1.1 base and large
# against the bf16 matmul peak measured in the same run, levers, and
# decoding against the reference.
#
#   bash bench/gpu_round2.sh prepare DIR              # where the data and TensorFlow are
#   bash bench/gpu_round2.sh run DIR OUT [LEVER ...]  # on the GPU host: OUT/<lever>.json
#
# Levers (default: base decode_base, about 9 minutes with a cold compilation cache):
#   base            T5 1.1 base, batch 64 in 2 microbatches, attention blocks of 256
#   base_one_block  the same with all 512 query rows in one attention block (no lax.map)
#   base_one_pass   the same with the batch in one pass (--grad_steps=1)
#   base_no_cmdbuf  the same with XLA's command buffers off
#   base_lhs        the same with XLA's latency-hiding scheduler on
#   base_bf16_logits
#                   the same with attention's logits and softmax in bfloat16 (T5X's default)
#   base_32k        base with T5's 32128-id head on both sides (the ids stay bytes)
#   base_32k_chunked
#                   the same, our loss taking 64 target positions' logits at a time
#   large           T5 1.1 large, as base
#   decode_base     greedy decoding at base, 6 batches of 64, sorted by length
#   largest         T5 1.1 XL (3B), our step alone with remat, batch 64 in one pass:
#                   the largest model bench/README.md sizes for one 139 GiB GPU
# Each run has its own time limit (LIMIT seconds, default 280), so one command
# stays within a 10-minute call; one that fails leaves its log beside the others'.
set -uo pipefail
usage="usage: $0 prepare DIR | run DIR OUT [LEVER ...]"
mode=${1:?$usage}
dir=$(realpath -m "${2:?$usage}")
cd "$(dirname "$0")/.."
train=(bench/train_throughput.py --dtype=bfloat16 --steps=3 --warmup=1)
decode=(bench/decode_throughput.py --dtype=bfloat16 --batches=6 --repeats=3 "--prepared=$dir/decode.npz")

case $mode in
  prepare)
    mkdir -p "$dir"
    python3 - "$dir" <<'EOF'
import sys
from bench import decode_throughput, train_throughput
d = sys.argv[1]
for grad_steps in (1, 2):
  train_throughput.build(train_throughput.parse_args(
      ['--config=mini', f'--grad_steps={grad_steps}', f'--prepared={d}/train_{grad_steps}.npz']))
decode_throughput.build(decode_throughput.parse_args(
    ['--config=mini', '--batches=6', f'--prepared={d}/decode.npz']))
EOF
    ;;
  run)
    out=$(realpath -m "${3:?$usage}")
    shift 3
    mkdir -p "$out"
    export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
    two=(--grad_steps=2 "--prepared=$dir/train_2.npz")
    levers=("$@")
    [[ ${#levers[@]} -gt 0 ]] || levers=(base decode_base)
    for name in "${levers[@]}"; do
      xla=''
      case $name in
        base) flags=("${train[@]}" --config=base "${two[@]}") ;;
        base_one_block) flags=("${train[@]}" --config=base "${two[@]}" --attention_block_size=512) ;;
        base_one_pass) flags=("${train[@]}" --config=base --grad_steps=1 "--prepared=$dir/train_1.npz") ;;
        base_no_cmdbuf) flags=("${train[@]}" --config=base "${two[@]}") xla=--xla_gpu_enable_command_buffer= ;;
        base_lhs) flags=("${train[@]}" --config=base "${two[@]}") xla=--xla_gpu_enable_latency_hiding_scheduler=true ;;
        base_bf16_logits) flags=("${train[@]}" --config=base "${two[@]}" --bfloat16_attention_logits) ;;
        base_32k) flags=("${train[@]}" --config=base "${two[@]}" --vocab_size=32128) ;;
        base_32k_chunked)
          flags=("${train[@]}" --config=base "${two[@]}" --vocab_size=32128 --loss_chunk_length=64) ;;
        large) flags=("${train[@]}" --config=large "${two[@]}") ;;
        decode_base) flags=("${decode[@]}" --config=base) ;;
        largest) flags=("${train[@]}" --config=xl --sides=ours --remat --grad_steps=1 "--prepared=$dir/train_1.npz") ;;
        *) echo "unknown lever $name; $usage" >&2; exit 2 ;;
      esac
      if timeout "${LIMIT:-280}" env XLA_FLAGS="$xla" python3 "${flags[@]}" \
        >"$out/$name.json" 2>"$out/$name.log"; then
        echo "$name: done"
      else
        echo "$name: failed or out of time (exit $?); see $out/$name.log"
      fi
    done
    ;;
  *)
    echo "$usage" >&2
    exit 2
    ;;
esac
