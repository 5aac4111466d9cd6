#!/usr/bin/env bash
# Tokens/s (all GPUs together) and peak memory per GPU of the distributed LoRA recipe on 1 GPU and
# on N GPUs, each GPU doing the same work (batch 2 x 2048 random tokens per GPU by default), then
# the scaling: N-GPU tokens/s over 1-GPU tokens/s. Needs no install: recipes are found by path.
#
#   python ../shared/bench/make_random_ckpt.py /tmp/llama8b --size 8b
#   benchmarks/distributed_bench.sh /tmp/llama8b            # N = 2
#   NGPUS=4 benchmarks/distributed_bench.sh /tmp/llama8b --steps 20 compile=True
#
# Extra arguments go to benchmarks/recipe_bench.py (--batch, --seq, --steps, --warmup, key=value).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
checkpoint=$1
shift
results=()
for gpus in 1 "${NGPUS:-2}"; do
    line=$(python3 -m torch.distributed.run --standalone --nproc_per_node "$gpus" benchmarks/recipe_bench.py \
        lora_finetune_distributed llama3_1/8B_lora "$checkpoint" "$@" | grep '^RESULT')
    echo "$line"
    results+=("$(sed -E 's/.* tokens_per_s=([0-9]+).*/\1/' <<< "$line")")
done
echo "SCALING gpus=${NGPUS:-2} tokens_per_s_ratio=$(python3 -c "print(f'{${results[1]} / ${results[0]}:.2f}')")"
