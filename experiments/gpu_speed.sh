#!/usr/bin/env bash
# Every GPU figure the speed goals need, in one call of at most 8 minutes of GPU time (issue 25's plan; the program
# itself was read beforehand without a GPU: experiments/results/gpu_inspect.md).
#   bash experiments/gpu_speed.sh INPUT.txt OUT_DIR [PARTS]   PARTS: a comma list, default gpt2,train,malloc,flags
# gpt2:   GPT-2 124M in bfloat16, batch 16 x 1024: jax_jit against torch_fast (PyTorch's fast path). MFU, the ratio
#         and each side's first call (cold compile) come out in OUT/gpt2_bfloat16/results.md.    About 150 s.
# train:  shakespeare_char as `gptjax train` runs it, from a cold compilation cache, to step 2000 (the preset's
#         schedule, which reaches val 1.47 near step 1750); then 250 steps with the cache warm.    About 90 s.
# malloc: the train step compiled cold in a 250-step run with the malloc settings gptjax applied on every host
#         before (one arena, gptjax.parallel.reuse_freed_memory's mallopt), against the same run without them
#         (`train_cold_250`): is the arena the cause of the 70 s compile?    About 60 s.
# flags:  the unrolled shakespeare_char step (gpu_probe.py: cold compile, median step, the kernels' times) with
#         XLA's Triton GEMMs off (gptjax's GPU flag) and on: the flag was measured on the scanned step only; on this
#         one only the inspection's bound speaks for it (5.39 against 5.73 ms, experiments/results/gpu_inspect.md).
#         About 80 s.
# char:   the harness on shakespeare_char (dropout 0, so both frameworks may use flash attention).
# sample: KV cache against re-forward, 256 new tokens, both frameworks.
# The gpt2 part tokenizes with tiktoken's GPT-2 ranks: set TIKTOKEN_CACHE_DIR where there is no internet.
# Every command runs on its own under a time limit; a failure is logged and the next one runs. OUT/summary.txt
# collects the lines the goals are read from.
set -u
input=$1 out=$2 parts=${3:-gpt2,train,malloc,flags}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
t_start=$(date +%s)
run() {  # run NAME LIMIT_S CMD...: the command's output in OUT/NAME.txt, its wall time at the end
    local name=$1 limit=$2; shift 2
    echo "== $name: $*" | tee "$out/$name.txt"
    local t0=$(date +%s.%N)
    timeout "$limit" "$@" >>"$out/$name.txt" 2>&1
    local rc=$? t1=$(date +%s.%N)
    echo "== $name: exit $rc, $(awk "BEGIN {print $t1 - $t0}") s wall" | tee -a "$out/$name.txt"
    tail -n 8 "$out/$name.txt" | cut -c 1-300
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', \
optax.__version__, 'torch', torch.__version__, jax.devices())"
    python -c "from gptjax import gpu; print('gptjax GPU flags', gpu.GPU_XLA_FLAGS)"
} >"$out/env.txt" 2>&1
cat "$out/env.txt"
g="python -m gptjax"
# the malloc settings every gptjax command applied before this change, then the CLI as usual
arena="import ctypes, sys; mallopt = ctypes.CDLL(None).mallopt
assert all(mallopt(p, v) == 1 for p, v in ((-3, 1 << 30), (-1, 1 << 30), (-8, 1)))
from gptjax import cli; sys.exit(cli.main(sys.argv[1:]))"
for p in ${parts//,/ }; do
case $p in
gpt2)
    run gpt2_bfloat16 300 $g bench --config=gpt2 --input="$input" --gradient_accumulation_steps=1 --dtype=bfloat16 \
        --batch_size=16 --modes=jax_jit,torch_fast --steps=10 --repeats=3 --out="$out/gpt2_bfloat16" ;;
train)
    export GPTJAX_CACHE_DIR=/tmp/gptjax-xla-speed
    rm -rf "$GPTJAX_CACHE_DIR" /tmp/gptjax-run /tmp/gptjax-run2
    run train_cold 200 $g train --config=shakespeare_char --input="$input" --out_dir=/tmp/gptjax-run --max_iters=2000
    cp /tmp/gptjax-run/metrics.jsonl "$out/train_cold_metrics.jsonl" 2>/dev/null
    run train_warm 60 $g train --config=shakespeare_char --input="$input" --out_dir=/tmp/gptjax-run2 --max_iters=250
    unset GPTJAX_CACHE_DIR ;;
malloc)
    for setting in default arena; do
        rm -rf /tmp/gptjax-xla-$setting /tmp/gptjax-m-$setting
        if [ $setting = default ]; then
            GPTJAX_CACHE_DIR=/tmp/gptjax-xla-$setting run train_cold_250 90 $g train --config=shakespeare_char \
                --input="$input" --out_dir=/tmp/gptjax-m-$setting --max_iters=250
        else
            GPTJAX_CACHE_DIR=/tmp/gptjax-xla-$setting run train_cold_250_arena 90 python -c "$arena" train \
                --config=shakespeare_char --input="$input" --out_dir=/tmp/gptjax-m-$setting --max_iters=250
        fi
    done ;;
flags)
    for triton in false true; do
        XLA_FLAGS=--xla_gpu_enable_triton_gemm=$triton run "probe_triton_$triton" 120 python experiments/gpu_probe.py \
            --config=shakespeare_char --input="$input" --steps=30 --top=15
    done ;;
char)
    run char_bfloat16 200 $g bench --config=shakespeare_char --input="$input" --dtype=bfloat16 --dropout=0 \
        --modes=jax_jit,torch_fast --steps=50 --repeats=5 --out="$out/char_bfloat16" ;;
sample)
    run sampling 200 $g bench --config=shakespeare_char --input="$input" --workload=generate --max_new_tokens=256 \
        --batch_size=1 --dropout=0 --modes=jax_jit,torch_fast --sampler=kv,reforward --steps=2 --repeats=3 \
        --out="$out/sampling" ;;
*) echo "unknown part $p: use gpt2, train, malloc, flags, char, sample" ;;
esac
done
{
    echo "GPU: $(head -1 "$out/env.txt")"
    grep -h "compiled the train step\|^done:" "$out"/train_*.txt 2>/dev/null
    grep -h "^compile + first step" "$out"/probe_triton_*.txt 2>/dev/null
    [ -f "$out/train_cold_metrics.jsonl" ] && python - "$out/train_cold_metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
hit = next((r for r in rows if r.get("val_loss", 9) <= 1.47), None)
print("first val <= 1.47:", f"step {hit['step']}, val {hit['val_loss']:.4f}, {hit['elapsed_s']:.1f} s into train()"
      if hit else "not reached", "| best val", min(r["val_loss"] for r in rows))
EOF
    grep -h "gptjax .* PyTorch\|MFU\|mfu" "$out"/gpt2_bfloat16/results.md 2>/dev/null | head -8
    echo "script wall: $(( $(date +%s) - t_start )) s"
} | tee "$out/summary.txt"
