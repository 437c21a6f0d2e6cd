#!/usr/bin/env bash
# The GPU measurements of experiments/results/gpu_speed.md, in parts that each fit in a 10-minute call.
#   bash experiments/gpu_speed.sh PART INPUT.txt OUT_DIR
# train:  the shakespeare_char run end to end (cold compile cache), eval, and 250 steps again (warm cache).
# gpt2:   the harness on the GPT-2 124M shape in bfloat16 (jax_jit against torch_fast).
# char:   the harness on shakespeare_char (dropout 0, so that both frameworks may use flash attention).
# sample: the sampling table: KV cache against re-forward, 256 new tokens, both frameworks.
# layers: scanned against unrolled blocks (compile and step) at depth 6, 12 and 24.
# The gpt2 part tokenizes with tiktoken's GPT-2 ranks: set TIKTOKEN_CACHE_DIR where there is no internet.
# Every command runs on its own; a failure is logged and the next one runs.
set -u
part=$1 input=$2 out=$3
mkdir -p "$out"
export PYTHONUNBUFFERED=1 GPTJAX_CACHE_DIR=${GPTJAX_CACHE_DIR:-/tmp/gptjax-xla}
run() {  # run NAME CMD...: the command's output in OUT/NAME.txt, its wall time at the end
    local name=$1; shift
    echo "== $name: $*" | tee "$out/$name.txt"
    local t0=$(date +%s.%N)
    "$@" >>"$out/$name.txt" 2>&1
    local rc=$? t1=$(date +%s.%N)
    echo "== $name: exit $rc, $(awk "BEGIN {print $t1 - $t0}") s wall" | tee -a "$out/$name.txt"
    tail -n 12 "$out/$name.txt" | cut -c 1-400
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', \
optax.__version__, 'torch', torch.__version__, jax.devices())"
} >"$out/env.txt" 2>&1
cat "$out/env.txt"
g="python -m gptjax"
for p in ${part//,/ }; do
case $p in
train)
    rm -rf "$GPTJAX_CACHE_DIR" /tmp/gptjax-run /tmp/gptjax-run2
    run train_cold $g train --config=shakespeare_char --input="$input" --out_dir=/tmp/gptjax-run
    cp /tmp/gptjax-run/metrics.jsonl /tmp/gptjax-run/loss.png /tmp/gptjax-run/config.json "$out/" 2>/dev/null
    run eval $g eval --out_dir=/tmp/gptjax-run
    run train_warm $g train --config=shakespeare_char --input="$input" --out_dir=/tmp/gptjax-run2 --max_iters=250 ;;
gpt2)
    run gpt2_bfloat16 $g bench --config=gpt2 --input="$input" --gradient_accumulation_steps=1 --dtype=bfloat16 \
        --batch_size=16 --modes=jax_jit,torch_fast --steps=10 --repeats=3 --out="$out/gpt2_bfloat16" ;;
char)
    run char_bfloat16 $g bench --config=shakespeare_char --input="$input" --dtype=bfloat16 --dropout=0 \
        --modes=jax_jit,torch_fast --steps=50 --repeats=5 --out="$out/char_bfloat16" ;;
char32)
    run char_float32 $g bench --config=shakespeare_char --input="$input" --dtype=float32 --dropout=0 \
        --modes=jax_jit,torch_compile,torch_fast --steps=50 --repeats=5 --out="$out/char_float32" ;;
sample)
    run sampling $g bench --config=shakespeare_char --input="$input" --workload=generate --max_new_tokens=256 \
        --batch_size=1 --dropout=0 --modes=jax_jit,torch_fast --sampler=kv,reforward --steps=2 --repeats=3 \
        --out="$out/sampling" ;;
layers)
    for scan in true false; do
        run "layers_scan_$scan" $g bench --config=shakespeare_char --input="$input" --modes=jax_jit --steps=20 \
            --repeats=3 --sweep=n_layer:6,12,24 --scan_layers=$scan --out="$out/layers_scan_$scan"
    done ;;
esac
done
