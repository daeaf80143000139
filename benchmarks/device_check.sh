#!/usr/bin/env bash
# One prepared GPU check for issue 8 (<= 5 minutes on an H200; results under $OUT).
#
# Run it through the device tool from the main checkout's root (not a worktree: the tool
# sends the main checkout), carrying the pyzmq wheel (the device image has no pyzmq):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl pyzmq==27.1.0
#   run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=420)
# Each step is time-boxed; a step that fails or runs out leaves its log and moves on.
# The device tool brings back at most 8 files: every log goes into one steps.log, beside
# the benchmarks' JSON files (5 files in all).
# A dry run anywhere else: DEV=cpu TOKENS=16 OUT=/tmp/dry bash benchmarks/device_check.sh
# Before a device session, `bash .ci/device_stack` runs the suite on the device image's
# versions (Python 3.12, torch 2.11, transformers 5.17) on the CPU; its venv's python3 on
# PATH makes the dry run use them too.
set -u
OUT=${OUT:-/tmp/device_out}
DEV=${DEV:-cuda}
TOKENS=${TOKENS:-1024}
mkdir -p "$OUT"
LOG=$OUT/steps.log
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
step() {  # step NAME SECONDS COMMAND...
    local name=$1 secs=$2 t0=$SECONDS rc; shift 2
    echo "== $name (<= ${secs}s): $*" >>"$LOG"
    timeout "$secs" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "== $name rc=$rc in $((SECONDS - t0)) s" >>"$LOG"
    echo "$name rc=$rc in $((SECONDS - t0)) s"
}
# The host's facts that set a call's floor: GPU, kernel (gVisor reports 4.4.0), clock source
# (a clock read costs ~50 ns on tsc, microseconds on hpet), a clock read and a sched_yield as
# Python pays them, the cores, and /dev/shm's size (a container's may be 64 MiB: channels
# that find no room there fall back to ZeroMQ, and the figures would show it).
{ echo "== host"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  uname -r; python3 --version
  python3 -c "import torch, zmq; print('torch', torch.__version__, 'pyzmq', zmq.__version__)"
  cat /sys/devices/system/clocksource/clocksource0/current_clocksource; nproc
  lscpu | grep -E "Model name|Socket|NUMA node\(s\)|Thread\(s\) per core"
  df -h /dev/shm /tmp
  python3 -m timeit -s "import time" "time.perf_counter_ns()"
  python3 -m timeit -s "import os" "os.sched_yield()"; } >>"$LOG" 2>&1
# Tests that need CUDA (the rest run on CI): registration, device buffers, the GPU worker.
step cuda_tests 45 python3 -m pytest -q -p no:cacheprovider tests/unit/test_codec.py \
    tests/unit/test_hostmem.py tests/unit/test_llama_split_inprocess.py \
    tests/integration/test_llama_actors.py -k "cuda or register or device_buffer"
# Llama-3.2-1B at T=1024, float32 wire: the split with the defaults and with
# private_io=False, verify=False (the issue's targets), chunked and not; transformers on the
# GPU (eager, sdpa, sdpa in bf16) and the all-in-TEE reference beside it; per-op table in
# the JSON. The actors read one checkpoint written by the benchmark (no per-process draw).
step llama_f32 120 python3 benchmarks/bench_llama.py --presets llama-3.2-1b --tokens "$TOKENS" \
    --repeats 3 --device "$DEV" --no-local --json "$OUT/llama_f32.json"
# bfloat16 wire: the targets' configuration and the defaults, transformers already above.
step llama_bf16 70 python3 benchmarks/bench_llama.py --presets llama-3.2-1b --tokens "$TOKENS" \
    --repeats 3 --device "$DEV" --wire-dtype bfloat16 --no-local --no-hf --no-unchunked \
    --json "$OUT/llama_bf16.json"
step echo 35 python3 benchmarks/bench_transport.py --sizes 32MiB,128MiB --json "$OUT/echo.json"
# Small messages and wake-ups on many cores (the issue: a no-op call 49-78 us p50 there).
step small 25 python3 benchmarks/bench_small.py --rounds 1 --n 2000 --json "$OUT/small.json"
echo "done: $(ls "$OUT" | tr '\n' ' ')"
