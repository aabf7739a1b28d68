#!/usr/bin/env bash
# shellcheck disable=SC2317  # info() and qlora() are run indirectly (timeout bash -c), which shellcheck cannot see
# GPU check: everything in this repository that needs a CUDA device, in one script that fits in 10 minutes.
#
#   make gpu-check                      # or: bash benchmarks/gpu_check.sh
#   PYTHON=/path/to/python GPU_CHECK_BUDGET=570 OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Stages (each under its own timeout, all within GPU_CHECK_BUDGET seconds, default 570; a stage that would
# start with under 20 s left is skipped and says so):
#   1. info      nvidia-smi; torch.cuda (devices, capability, bf16, memory)
#   2. install   liger-kernel (the pin in pyproject.toml) and flash-attn, prebuilt wheels only, each under a
#                short pip timeout; skipped with a message where pip cannot get them quickly (flash-attn is
#                never built from source); torch is checked unchanged afterwards
#   3. tests     pytest -m "not e2e" on the CUDA tests (tests/trainer/test_cuda.py, and the tests of
#                tests/model/test_loading.py and tests/trainer/test_precision.py about CUDA, flash-attn, Liger)
#   4. bench     benchmarks/bench_train.py --device cuda on the embedded SmolLM2-135M-Instruct against TRL 1.16
#                (bf16 autocast: TRL's best on a GPU; and bf16 + Liger when liger-kernel is there); sftlab with
#                train.liger=true when liger-kernel is there; then `--adapter lora` (LoRA r=16 on every linear
#                layer, both sides), sftlab with recompute off and on beside TRL bf16 and bf16-gc
#   4b. attention benchmarks/bench_compile.py --device cuda --dtype bf16 on SmolLM2-135M, 1x1024 packed: the
#                whole-step options eager/compiled x documents/mask/flex and eager varlen (flash-attention 2 with
#                the packed position ids, where flash-attn is installed): tokens/s against eager documents, losses
#                checked against it (bf16: 1e-2)
#   5. qlora     bench_train.py --adapter qlora: the same LoRA on an nf4 base (bitsandbytes, installed if missing)
#   6. bench-1b  bench_train.py --model random-1b (a Llama-3.2-1B-shaped random model on SmolLM2's tokenizer)
#   7. seq-par   with >= 2 GPUs: tests/trainer/test_sequence_parallel.py on CUDA (2-way DeepSpeed Ulysses equals
#                one process per step within 1e-5), then benchmarks/bench_sequence.py at 2x and 4x a base length
#                with and without train.sequence_parallel: 2 (peak memory per device); "skipped: needs 2 GPUs"
# Each prints tokens/s, MFU and peak GPU memory (torch.cuda.max_memory_allocated). The summary goes to stdout
# and, when $OUT is set, to $OUT/gpu_check.txt (the stages' logs to $OUT/gpu_check_logs/).
# Without a CUDA device it says so and exits 0 having run nothing (GPU_CHECK_REQUIRE=1: exit 1 instead).
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=$(command -v python3 || command -v python); fi
BUDGET=${GPU_CHECK_BUDGET:-570}
START=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sftlab-gpu-check.XXXXXX")
SUMMARY=$WORK/summary.txt
: > "$SUMMARY"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's sftlab, whatever is installed
export ROOT PY WORK
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TQDM_DISABLE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - (SECONDS - START))); }

finish() {
    local rc=$1
    say "gpu-check: $((SECONDS - START)) s in all, exit $rc"
    echo
    echo "===== gpu-check summary ====="
    cat "$SUMMARY"
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT/gpu_check_logs"
        cp "$SUMMARY" "$OUT/gpu_check.txt"
        cp "$WORK"/*.log "$WORK"/*.json "$OUT/gpu_check_logs/" 2>/dev/null
        echo "(written to $OUT/gpu_check.txt)"
    fi
    rm -rf "$WORK"
    exit "$rc"
}

# stage NAME LIMIT_S CMD...: runs CMD under min(LIMIT_S, what is left), logs to $WORK/NAME.log, records the outcome
FAILED=0
stage() {
    local name=$1 limit=$2 budget rc t0
    shift 2
    budget=$(left)
    if [ "$budget" -lt 20 ]; then
        say "[$name] SKIPPED: the ${BUDGET}s budget is spent"
        return 124
    fi
    [ "$limit" -gt "$budget" ] && limit=$budget
    echo
    echo "===== [$name] (timeout ${limit}s): $*"
    t0=$SECONDS
    if declare -F "$1" > /dev/null; then  # a function of this script: timeout runs it in a bash of its own
        timeout --kill-after=10 "$limit" bash -c "$*" 2>&1 | tee "$WORK/$name.log"
    else
        timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
    fi
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then say "[$name] ok ($((SECONDS - t0)) s)"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then say "[$name] TIMED OUT after ${limit}s"; FAILED=1
    else say "[$name] FAILED (exit $rc, $((SECONDS - t0)) s; log: gpu_check_logs/$name.log)"; FAILED=1; fi
    return "$rc"
}

say "gpu-check of $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') with $PY, $(date -u +%FT%TZ)"

# --- 0/1. is there a CUDA device? ------------------------------------------------------------------------
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" 2>/dev/null; then
    msg=$("$PY" -c "import torch; print(f'torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda.is_available() False')" 2>&1 | tail -1)
    say "gpu-check: SKIPPED: no CUDA device ($msg); nothing run"
    command -v nvidia-smi > /dev/null && say "  (nvidia-smi exists: $(nvidia-smi -L 2>&1 | head -1))"
    finish "$([ "${GPU_CHECK_REQUIRE:-0}" = 1 ] && echo 1 || echo 0)"
fi

info() {
    command -v nvidia-smi > /dev/null && nvidia-smi || echo "nvidia-smi: not found"
    "$PY" - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i}: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
          f"{p.multi_processor_count} SMs, bf16 {torch.cuda.is_bf16_supported()}")
EOF
}
export -f info
stage info 30 info
say "  $("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}')" 2>&1 | tail -1)"

# --- 2. optional kernels ---------------------------------------------------------------------------------
has() { "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$1') else 1)"; }
TORCH_BEFORE=$("$PY" -c "import torch; print(torch.__version__)")
install() {  # install NAME MODULE SPEC: prebuilt wheels only, short network timeouts
    local failed=$FAILED
    if has "$2"; then say "  $1: already installed"; return 0; fi
    if stage "install-$1" 75 "$PY" -m pip install --quiet --only-binary=:all: --timeout 10 --retries 1 "$3"; then
        say "  $1: installed ($3)"
    else
        FAILED=$failed  # an optional kernel pip cannot get quickly is not a failure of the check
        say "  $1: not installed (no prebuilt wheel reachable in time; not built from source): skipped"
    fi
}
install liger-kernel liger_kernel "$(grep -o 'liger-kernel==[0-9.]*' pyproject.toml | head -1 || echo liger-kernel)"
install flash-attn flash_attn flash-attn
TORCH_AFTER=$("$PY" -c "import torch; print(torch.__version__)")
[ "$TORCH_BEFORE" != "$TORCH_AFTER" ] && say "  WARNING: installing changed torch $TORCH_BEFORE -> $TORCH_AFTER"
LIGER=0; has liger_kernel && LIGER=1

# --- 3. the CUDA tests -----------------------------------------------------------------------------------
stage tests 100 "$PY" -m pytest -q -rs -m "not e2e" -p no:cacheprovider \
    tests/trainer/test_cuda.py tests/model/test_loading.py tests/trainer/test_precision.py -k "cuda or flash or liger"
say "  pytest: $(grep -E '[0-9]+ (passed|failed|skipped|error)|no tests ran' "$WORK/tests.log" 2>/dev/null | tail -1)"

# --- 4. training throughput against TRL on the GPU ---------------------------------------------------------
report_bench() {  # the bench's JSON -> one line per side: tokens/s, MFU, peak GPU memory; the ratio
    [ -f "$1" ] || { say "  (no results: $1)"; return; }
    "$PY" - "$1" <<'EOF' | tee -a "$SUMMARY"
import json, sys
d = json.load(open(sys.argv[1]))
print(f"  model: {d['model']}; 6N ceiling {d['six_n_ceiling_tokens_per_s'] or 0:,.0f} tokens/s")
for s in d["summary"]:
    mfu = f"{s['mfu']:.1%}" if s.get("mfu") is not None else "-"
    gpu = f"{s['peak_gpu_mb']:,.0f} MB" if s.get("peak_gpu_mb") else "-"
    print(f"  {s['side']:15s} mb {s['micro_batch_size']}: {s['tokens_per_s']:10,.0f} tokens/s, MFU {mfu:>6s}, "
          f"peak GPU {gpu}, first-step loss {s['first_loss']:.4f}")
for mbs in d["cases"]:
    rows = {s["side"]: s for s in d["summary"] if s["micro_batch_size"] == mbs}
    trl = [v for k, v in rows.items() if k.startswith("trl:")]
    if not trl:
        continue
    best = max(trl, key=lambda v: v["tokens_per_s"])
    for side, s in rows.items():
        if side.startswith("sftlab"):
            gc = side.endswith(":on")  # sftlab:on recomputes, like TRL's -gc configurations
            same = [v for k, v in rows.items() if k.startswith("trl:") and k.endswith("-gc") == gc]
            eq = max(same, key=lambda v: v["tokens_per_s"]) if same and not side.endswith(":auto") else None
            mem = lambda a, b: f", peak GPU {a['peak_gpu_mb'] / b['peak_gpu_mb']:.2f}x" if a.get("peak_gpu_mb") and b.get("peak_gpu_mb") else ""
            print(f"  mb {mbs}: {side} / TRL best {s['tokens_per_s'] / best['tokens_per_s']:.2f}x tokens/s{mem(s, best)}"
                  + (f"; at equal recompute / {eq['side']}: {s['tokens_per_s'] / eq['tokens_per_s']:.2f}x tokens/s{mem(s, eq)}" if eq else ""))
print("  checks: " + ("; ".join(d["failed_checks"]) or "all passed"))
EOF
}
SFT_OPTS=(); TRL_SET=bf16
if [ "$LIGER" = 1 ]; then SFT_OPTS=(--sftlab-override train.liger=true); TRL_SET=bf16,bf16-liger; fi
stage bench-135m 120 "$PY" benchmarks/bench_train.py --device cuda --steps 8 --cases 4 --trl-configs "$TRL_SET" \
    --sftlab-configs auto "${SFT_OPTS[@]}" --json "$WORK/bench-135m.json"
report_bench "$WORK/bench-135m.json"
stage bench-lora 110 "$PY" benchmarks/bench_train.py --device cuda --steps 6 --cases 4 --adapter lora \
    --trl-configs bf16,bf16-gc --sftlab-configs off,on --json "$WORK/bench-lora.json"
report_bench "$WORK/bench-lora.json"

# --- 4b. packed attention: documents vs mask vs flex vs flash-attention varlen, eager and compiled -------------
stage attention 90 "$PY" benchmarks/bench_compile.py --device cuda --dtype bf16 --repeats 2
sed -n '/^option/,$p' "$WORK/attention.log" 2>/dev/null | sed 's/^/  /' | tee -a "$SUMMARY"

# --- 5. QLoRA nf4 against TRL ---------------------------------------------------------------------------
qlora() {
    has bitsandbytes || "$PY" -m pip install --quiet --only-binary=:all: --timeout 10 --retries 1 \
        "$(grep -o 'bitsandbytes==[0-9.]*' pyproject.toml | head -1)" || { echo "bitsandbytes: not installable"; return 3; }
    "$PY" benchmarks/bench_train.py --device cuda --steps 6 --cases 4 --adapter qlora --trl-configs bf16 \
        --sftlab-configs off --json "$WORK/bench-qlora.json"
}
export -f qlora has
stage qlora 90 qlora
report_bench "$WORK/bench-qlora.json"

# --- 6. a 1B-shaped model --------------------------------------------------------------------------------
stage bench-1b 150 "$PY" benchmarks/bench_train.py --device cuda --model random-1b --steps 6 --cases 1 \
    --trl-configs "$TRL_SET" --sftlab-configs auto "${SFT_OPTS[@]}" --json "$WORK/bench-1b.json"
report_bench "$WORK/bench-1b.json"

# --- 7. sequence parallelism (DeepSpeed Ulysses, 2 GPUs) ------------------------------------------------------
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -ge 2 ]; then
    stage seq-par-tests 120 "$PY" -m pytest -q -rs -p no:cacheprovider tests/trainer/test_sequence_parallel.py
    say "  pytest: $(grep -E '[0-9]+ (passed|failed|skipped|error)' "$WORK/seq-par-tests.log" 2>/dev/null | tail -1)"
    stage seq-par-memory 150 "$PY" benchmarks/bench_sequence.py --device cuda --model random-1b --sp 1 2 --lengths 8192 16384 \
        --cap-gib 1000 --timeout 60 --json "$WORK/seq-par.json"
    grep -h "^sequence_parallel\|peak" "$WORK/seq-par-memory.log" 2>/dev/null | sed 's/^/  /' | tee -a "$SUMMARY"
else
    say "[seq-par] skipped: needs 2 GPUs ($GPUS here)"
fi

finish "$FAILED"
