#!/usr/bin/env bash
# Every GPU check in one run, for a machine with a CUDA GPU and torch / triton / transformers /
# sentence-transformers already installed, and no network:
#   install the project (no dependencies), print the GPU and versions; then, side by side (they
#   are correctness checks, and mostly compile Triton kernels on the CPU cores), the GPU-marked
#   tests, the kernel tests on the GPU (two processes), the API tests (test_api, test_chunking,
#   test_quantize, with their models on the GPU) and the CLI tests, and parity against
#   transformers; then, alone on the GPU, the model benchmark against the peers and the op-by-op
#   benchmark (kernels vs torch, attention vs torch's kernels, a profile by op, an attention tile
#   sweep) and the HTTP server under load (bench_serve.py); a summary.
# Results (JSON, markdown tables, one log per step and part) go to $OUT/device-check when OUT is
# set, else ./device-check-out. Each step runs under `timeout`; a failed or timed-out step is
# reported in the summary and the run goes on. About 7 minutes on an H100; DEVICE_CHECK_BUDGET
# (seconds, default 540) caps the whole run: each step gets at most what is left of it after the
# time kept for the steps after it.
#
#   bash benchmarks/device_check.sh            # or: make device-check
set -u

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-$(command -v python || command -v python3 || echo python)}
if [ -n "${OUT:-}" ]; then DEST="$OUT/device-check"; else DEST="$ROOT/device-check-out"; fi
mkdir -p "$DEST"
rm -f "$DEST/results.md" "$DEST/parity.md" "$DEST/serve.md" "$DEST/ops.md" "$DEST/pythonpath" "$DEST"/*.rc
BUDGET=${DEVICE_CHECK_BUDGET:-540}
START=$(date +%s)
SUMMARY="$DEST/summary.tsv"
printf 'step\tstatus\tseconds\tlog\n' > "$SUMMARY"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODERNBERT_EMBED_COMMIT=${MODERNBERT_EMBED_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export MODERNBERT_EMBED_COMMIT

# status_of RC: how an exit status reads in the summary (5 is pytest's "no tests collected")
status_of() {
    case $1 in
        0) echo ok ;;
        124|137) echo TIMEOUT ;;
        5) echo "no tests collected" ;;
        *) echo "FAIL (rc $1)" ;;
    esac
}

# step NAME LIMIT_S RESERVE_S CMD... : run CMD (a command or one of the functions below) with its
# output in $DEST/NAME.log and on the console, under min(LIMIT_S, what is left of the budget once
# RESERVE_S is kept for the steps after it); records the outcome. The limit is in $STEP_LIMIT.
step() {
    local name=$1 limit=$2 reserve=$3
    shift 3
    local left status rc t0
    left=$((BUDGET - ($(date +%s) - START) - reserve))
    if [ "$left" -lt 20 ]; then
        printf '%s\t%s\t%s\t%s\n' "$name" "SKIPPED (budget spent)" 0 "-" >> "$SUMMARY"
        echo "=== $name: skipped, the budget of ${BUDGET}s is spent"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    export STEP_LIMIT=$limit
    echo "=== $name (limit ${limit}s): $*"
    t0=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$limit" bash -c '"$@"' _ "$@" 2>&1 | tee "$DEST/$name.log"
    rc=${PIPESTATUS[0]}
    status=$(status_of "$rc")
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$name.log" >> "$SUMMARY"
    echo "=== $name: $status"
}

install() {
    if "$PY" -m pip install --no-deps --no-build-isolation --no-index -q -e . ; then
        return 0
    fi
    # Without pip (or setuptools) the package still imports from the repository itself.
    echo "pip install failed; importing the package from $ROOT instead"
    echo "$ROOT" > "$DEST/pythonpath"
    return 1
}

environment() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv || nvidia-smi
    "$PY" - <<'PYEOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
for dist in ("triton", "transformers", "sentence-transformers", "tokenizers", "safetensors", "numpy", "pytest",
             "modernbert-embed"):
    try:
        print(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist} NOT INSTALLED")
import modernbert_embed
print("modernbert_embed from", modernbert_embed.__file__)
try:
    from modernbert_embed.kernels import triton_ops
    print("triton ops:", triton_ops().name)
except Exception as e:
    print("triton ops NOT importable:", type(e).__name__, e)
try:
    from modernbert_embed.kernels.torch_varlen import varlen_available, varlen_supports_window
    print("torch varlen attention:", varlen_available(), "| window_size:", varlen_supports_window())
except Exception as e:
    print("torch varlen attention NOT importable:", type(e).__name__, e)
PYEOF
}

# part NAME CMD... : run CMD in the background with its output in $DEST/NAME.log, under the
# step's limit less a margin; `wait_parts` waits for all of them and records each in the summary.
PARTS=()
part() {
    local name=$1
    shift
    ( t0=$(date +%s)
      timeout --signal=TERM --kill-after=5 $((STEP_LIMIT > 30 ? STEP_LIMIT - 10 : STEP_LIMIT)) "$@" \
          > "$DEST/$name.log" 2>&1
      echo "$? $(( $(date +%s) - t0 ))" > "$DEST/$name.rc" ) &
    PARTS+=("$name")
}

wait_parts() {
    local name rc secs status worst=0
    wait
    for name in "${PARTS[@]}"; do
        read -r rc secs < "$DEST/$name.rc" 2>/dev/null || { rc=1; secs=0; }
        status=$(status_of "$rc")
        [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ] && worst=1
        printf '%s\t%s\t%s\t%s\n' "  $name" "$status" "$secs" "$name.log" >> "$SUMMARY"
        echo "----- $name: $status in ${secs}s; the last lines of $name.log:"
        tail -n 25 "$DEST/$name.log"
    done
    PARTS=()
    return $worst
}

checks() {
    # Side by side: each part mostly compiles kernels (one CPU core each) and runs small GPU work.
    # The GPU-marked tests alone would take the longest; the kernel tests are spread over workers
    # (pytest-xdist) or, without it, split in two.
    export OMP_NUM_THREADS=4
    local pytest=("$PY" -m pytest -q -rfEs -p no:cacheprovider)
    part pytest-gpu "${pytest[@]}" -m gpu --junitxml="$DEST/pytest-gpu.xml"
    local f
    if "$PY" -c "import xdist" 2>/dev/null; then
        # pytest-xdist: the kernel tests' compiles spread over six workers
        part kernel-tests "${pytest[@]}" -n 6 -m "not gpu" --junitxml="$DEST/kernel-tests.xml" \
            tests/test_kernels.py tests/test_attention.py
    else
        for f in tests/test_kernels.py tests/test_attention.py; do
            [ -f "$f" ] && part "kernel-tests-$(basename "$f" .py)" "${pytest[@]}" -m "not gpu" \
                --junitxml="$DEST/kernel-tests-$(basename "$f" .py).xml" "$f"
        done
    fi
    # The API and CLI tests on the GPU: MODERNBERT_EMBED_TEST_DEVICE=cuda puts their models on the
    # GPU (in float32, see tests/conftest.py), so that the GPU defaults run (tokenising beside the
    # model, the corpus reader thread, progress by CUDA events). Slow tests are left to `make test`.
    export MODERNBERT_EMBED_TEST_DEVICE=cuda
    part api-tests "${pytest[@]}" -m "not slow" --junitxml="$DEST/api-tests.xml" \
        tests/test_api.py tests/test_chunking.py tests/test_quantize.py
    part cli-tests "${pytest[@]}" -m "not slow" --junitxml="$DEST/cli-tests.xml" tests/test_cli.py
    part parity "$PY" benchmarks/parity_gpu.py --out "$DEST/parity_gpu.json" --markdown "$DEST/parity.md"
    wait_parts
}

bench() {
    # New rows stop 50 s before the step's limit, so the benchmark ends on its own with everything
    # it measured written.
    "$PY" benchmarks/bench_gpu.py --time-budget $((STEP_LIMIT > 110 ? STEP_LIMIT - 50 : 60)) \
        --out "$DEST/bench_gpu.json" --markdown "$DEST/results.md"
}

serve() {
    # The HTTP server under load on the GPU (our server only: the device image has no Infinity):
    # one short text per request up to concurrency 256, and 512-token requests. The server needs
    # the serve extra (starlette, uvicorn); an image without it skips this step and says so.
    if ! "$PY" -c "import starlette, uvicorn" 2>/dev/null; then
        echo "serve benchmark not run: this image has no starlette/uvicorn (pip install .[serve])"
        return 0
    fi
    "$PY" benchmarks/bench_serve.py --device cuda --dtype bfloat16 --concurrency 1,64,256 \
        --workloads short,long512 --min-requests 64 \
        --logs "$DEST/serve-logs" --out "$DEST/bench_serve.json" --markdown "$DEST/serve.md"
}

ops() {
    # The tile sweep (last) stops 30 s before the step's limit.
    "$PY" benchmarks/bench_ops_gpu.py --time-budget $((STEP_LIMIT > 60 ? STEP_LIMIT - 30 : 30)) \
        --out "$DEST/bench_ops_gpu.json" --markdown "$DEST/ops.md"
}

export PY DEST ROOT
export SUMMARY
export -f status_of install environment part wait_parts checks bench serve ops

echo "device check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $MODERNBERT_EMBED_COMMIT, results in $DEST"
#    name          limit reserve  command      (install and environment always run: no reserve)
step install       60    0        install
[ -f "$DEST/pythonpath" ] && export PYTHONPATH="$(cat "$DEST/pythonpath")${PYTHONPATH:+:$PYTHONPATH}"
step environment   45    0        environment
step checks        180   300      checks
step bench         190   150      bench
step serve         90    60       serve
step ops           60    0        ops

echo
for f in parity.md results.md serve.md ops.md; do
    [ -f "$DEST/$f" ] && cat "$DEST/$f" && echo
done
echo "================================ summary ================================"
echo "device check: $(( $(date +%s) - START ))s of a ${BUDGET}s budget; commit $MODERNBERT_EMBED_COMMIT; results in $DEST"
sed -n '2,3p' "$DEST/environment.log" 2>/dev/null
for f in pytest-gpu kernel-tests kernel-tests-test_kernels kernel-tests-test_attention api-tests cli-tests; do
    [ -f "$DEST/$f.log" ] && echo "$f: $(grep -E '(passed|failed|error|skipped|no tests ran)' "$DEST/$f.log" | tail -n 1)"
done
[ -f "$DEST/parity.log" ] && grep -E '^parity_gpu: .*failed' "$DEST/parity.log"
if [ -f "$DEST/bench_gpu.json" ]; then
    "$PY" - "$DEST/bench_gpu.json" <<'PYEOF'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
for r in rows:
    if r["goal"]:
        print(f"goal: {r['engine']} {r['dtype']} {r['variant']} on {r['corpus']}: {r['goal']}")
bad = [r for r in rows if r["error"]]
print(f"bench rows: {len(rows) - len(bad)} measured, {len(bad)} with an error or skipped")
PYEOF
fi
if [ -f "$DEST/bench_ops_gpu.json" ]; then
    "$PY" - "$DEST/bench_ops_gpu.json" <<'PYEOF'
import json, sys
rec = json.load(open(sys.argv[1]))
for case in dict.fromkeys(r["case"] for r in rec["attention"]):
    parts = [f"{r['impl'].split(' ')[0]} {r['tflops']:.0f}" for r in rec["attention"] if r["case"] == case and r["tflops"]]
    print(f"attention {case} TFLOP/s: " + ", ".join(parts))
for name, p in rec.get("profile", {}).items():
    if "groups_ms" in p:
        shares = ", ".join(f"{g} {ms / p['kernel_ms']:.0%}" for g, ms in list(p["groups_ms"].items())[:5])
        busy = f"GPU busy {p['busy_share']:.0%}; " if p.get("busy_share") is not None else ""
        print(f"profile {name}: {p['wall_ms']:.2f} ms/forward, {busy}{shares}")
for case in dict.fromkeys(r["case"] for r in rec.get("sweep", [])):
    rows = [r for r in rec["sweep"] if r["case"] == case and r["ms"]]
    best = min(rows, key=lambda r: r["ms"], default=None)
    default = next((r for r in rows if r["default"]), None)
    if best and default:
        print(f"tiles {case}: default {tuple(default['tile'])} {default['ms']:.3g} ms, best {tuple(best['tile'])} {best['ms']:.3g} ms")
PYEOF
fi
echo
column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
# Nonzero when a step did not end well, so that a caller sees it.
if tail -n +2 "$SUMMARY" | grep -q -v -E $'\t(ok|no tests collected)\t'; then exit 1; fi
exit 0
