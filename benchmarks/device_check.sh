#!/usr/bin/env bash
# One prepared GPU check for issue 8 (<= 5 minutes on an H200; results under $OUT).
#
# Run it through the device tool from the repo root, carrying the pyzmq wheel:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl pyzmq==27.1.0
#   run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=420)
# Each step is time-boxed; a step that fails or runs out leaves its log and moves on.
set -u
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
step() {  # step NAME SECONDS COMMAND...
    local name=$1 secs=$2; shift 2
    echo "== $name (<= ${secs}s)"
    timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
    echo "   rc=$? $(tail -n 3 "$OUT/$name.log" | tr '\n' ' ' | cut -c1-300)"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
# The host's facts that set a call's floor: clock source (a clock read costs ~50 ns on tsc,
# microseconds on hpet), a clock read and a sched_yield as Python pays them, the cores.
{ cat /sys/devices/system/clocksource/clocksource0/current_clocksource; nproc
  lscpu | grep -E "Model name|Socket|NUMA node\(s\)|Thread\(s\) per core"
  python3 -m timeit -s "import time" "time.perf_counter_ns()"
  python3 -m timeit -s "import os" "os.sched_yield()"; } >"$OUT/host.txt" 2>&1
# Tests that need CUDA (the rest run on CI): registration, device buffers, the GPU worker.
step cuda_tests 70 python3 -m pytest -q -p no:cacheprovider tests/unit/test_codec.py \
    tests/unit/test_hostmem.py tests/unit/test_llama_split_inprocess.py \
    tests/integration/test_llama_actors.py -k "cuda or register or device_buffer"
# Llama-3.2-1B at T=1024: float32 and bfloat16 wire, open placement and the defaults,
# transformers (sdpa, both dtypes) and the split side by side, per-op table printed.
step llama_f32 95 python3 benchmarks/bench_llama.py --presets llama-3.2-1b --tokens 1024 \
    --repeats 5 --device cuda --no-local --json "$OUT/llama_f32.json"
step llama_bf16 75 python3 benchmarks/bench_llama.py --presets llama-3.2-1b --tokens 1024 \
    --repeats 5 --device cuda --wire-dtype bfloat16 --no-local --no-hf \
    --json "$OUT/llama_bf16.json"
step echo 35 python3 benchmarks/bench_transport.py --sizes 32MiB,128MiB --json "$OUT/echo.json"
# Small messages and wake-ups on many cores (the issue: a no-op call 49-78 us p50 there).
step small 25 python3 benchmarks/bench_small.py --rounds 1 --n 2000 --json "$OUT/small.json"
echo "done: $(ls "$OUT" | tr '\n' ' ')"
