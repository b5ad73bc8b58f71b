#!/usr/bin/env bash
# One GPU lease in one call (issue #11): the CUDA tests, the step profile, then as much of the
# CIFAR-10 study as the remaining time allows. Every stage has its own time limit, so a slow stage
# cannot take the others' time, and everything lands in OUT/gpu-session.tgz (plus the small logs).
#
#   bash benchmarks/gpu_session.sh OUT SECONDS [DATA]
#
# DATA defaults to .data/cifar10_jpeg.npz (an ignored folder of the checkout, carried to the GPU
# machine). Run from the repository root; fop is imported from src/ (nothing is installed).
# On a machine without CUDA it runs the same stages on the CPU at toy size (a dry run of the script).
# STAGES (default "1 2 3") picks stages; EPOCHS fixes the study's epoch budget instead of deriving it;
# STUDY_LRS ("1"), STUDY_OPTIMIZERS ("fop,kfac,sgd,adamw"), STUDY_CELLS, BASELINES (none) and TARGET
# shape stage 3; stage 4 (not in the default) profiles PROFILE_OPTIMIZERS after the study; stage 5 (not
# in the default) runs the next cells of the paper's Table 1 (issue #19, benchmarks/table1.py) that fit the
# time left and writes OUT/table1/runs.jsonl and OUT/table1/README.md, to be copied into results/gpu/table1/
# (TABLE1_PLAN names another plan; on a machine without CUDA the first TABLE1_TOY cells, default 2, at toy size).
set -u
OUT=${1:?usage: gpu_session.sh OUT SECONDS [DATA]}
TOTAL=${2:?usage: gpu_session.sh OUT SECONDS [DATA]}
DATA=${3:-.data/cifar10_jpeg.npz}
PYTHON=${PYTHON:-python3}
START=$(date +%s)
WORK=$(mktemp -d)
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 FOP_CACHE_DIR=${FOP_CACHE_DIR:-$WORK/cache}

left() { echo $((TOTAL - ($(date +%s) - START))); }
log() { echo "[$(date +%T) +$(($(date +%s) - START))s] $*" | tee -a "$WORK/session.log"; }
stage() {  # stage NAME LIMIT COMMAND...: run with a time limit, log its exit status
    local name=$1 limit=$2
    shift 2
    log "$name: start (limit ${limit}s)"
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    log "$name: rc=$?"
}

BENCH=("$PYTHON" -m fop.bench --task cifar10-resnet18 --data "$DATA" --no-progress)
if "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    DEVICE=cuda SIZE=()
else
    DEVICE=cpu SIZE=(--subset 256 --width 4 --threads 2)
fi
{
    nvidia-smi 2>&1 || true
    "$PYTHON" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
} >"$WORK/env.txt" 2>&1
log "device $DEVICE, $(left)s for the session"

STAGES=" ${STAGES:-1 2 3} "
# 1. the CUDA path (tests/test_cuda.py, marker cuda)
if [[ $STAGES != *" 1 "* ]]; then
    :
elif [ "$DEVICE" = cuda ]; then
    stage stage1-cuda-tests 120 "$PYTHON" -m pytest -m cuda tests/test_cuda.py -q -rA -p no:cacheprovider
else
    FOP_TEST_DEVICE=cpu stage stage1-cuda-tests 120 "$PYTHON" -m pytest -m cuda tests/test_cuda.py -q -rA -p no:cacheprovider
fi

# 2. the step profile: SGD, AdamW, K-FAC and FOP side by side (the first command also decodes the pack)
if [ "$DEVICE" = cuda ]; then B_MAIN=4096 B_BIG=16384; else B_MAIN=32 B_BIG=64; fi
if [[ $STAGES == *" 2 "* ]]; then
stage stage2-profile-i10 150 "${BENCH[@]}" "${SIZE[@]}" --device "$DEVICE" --profile --profile-steps 10 \
    --batch-sizes "$B_MAIN,$B_BIG" --curvature-interval 10 --out "$WORK/profile-i10"
stage stage2-profile-i5 60 "${BENCH[@]}" "${SIZE[@]}" --device "$DEVICE" --profile --profile-steps 10 \
    --batch-sizes "$B_MAIN" --curvature-interval 5 --out "$WORK/profile-i5"
fi

# 3. the study at the main batch size, one learning rate, one seed: the epoch budget is what the
#    remaining time allows at the profiled step times (one budget for every optimizer)
[ -n "${EPOCHS:-}" ] || EPOCHS=$("$PYTHON" - "$WORK/profile-i10/profile.md" "$B_MAIN" "$(($(left) - 60))" <<'EOF'
import re, sys
path, batch, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    rows = [line.split("|") for line in open(path) if line.startswith(f"| {batch} |")]
    per_epoch = sum(50000 / batch * float(r[4]) / 1000 + 1.5 for r in rows)  # + evaluation, logging
except (OSError, ValueError):
    per_epoch = 0.0
runs = 4
epochs = int((seconds - 20 * runs) / per_epoch) if per_epoch > 0 else 0
print(max(0, min(epochs, 40)))
EOF
)
log "study: $EPOCHS epochs per run"
# STUDY_LRS: one command per learning-rate factor, K-FAC and FOP side by side in each (so a time-out
# loses a whole pair, not half of one); BASELINES run first, at the task's learning rate.
TARGET_ARGS=()
[ -z "${TARGET:-}" ] || TARGET_ARGS=(--target "$TARGET")
if [[ $STAGES == *" 3 "* ]] && [ "${EPOCHS:-0}" -ge 3 ]; then
    if [ -n "${BASELINES:-}" ]; then
        stage stage3-baselines $(($(left) - 25)) "${BENCH[@]}" "${SIZE[@]}" --device "$DEVICE" \
            --batch-sizes "$B_MAIN" --optimizers "$BASELINES" --lr-grid 1 --extend-edges 0 \
            --max-epochs "$EPOCHS" "${TARGET_ARGS[@]}" --out "$WORK/study"
    fi
    # STUDY_CELLS ("LR:OPTIMIZERS LR:OPTIMIZERS ...", e.g. "0.1:kfac:fs512,fop:fs512") replaces STUDY_LRS
    cells=${STUDY_CELLS:-}
    if [ -z "$cells" ]; then
        for lr in ${STUDY_LRS:-1}; do cells="$cells $lr:${STUDY_OPTIMIZERS:-fop,kfac,sgd,adamw}"; done
    fi
    for cell in $cells; do
        lr=${cell%%:*}
        stage "stage3-study-lr$lr-${cell#*:}" $(($(left) - 25)) "${BENCH[@]}" "${SIZE[@]}" --device "$DEVICE" \
            --batch-sizes "$B_MAIN" --optimizers "${cell#*:}" --lr-grid "$lr" \
            --extend-edges 0 --max-epochs "$EPOCHS" "${TARGET_ARGS[@]}" --out "$WORK/study"
    done
fi

# 4. a profile of chosen optimizers after the study (PROFILE_OPTIMIZERS, at the main batch size and
#    PROFILE_INTERVAL, default 5: the batch-size rule's interval at 4096), for the phase columns
if [[ $STAGES == *" 4 "* ]] && [ -n "${PROFILE_OPTIMIZERS:-}" ]; then
    stage stage4-profile $(($(left) - 20)) "${BENCH[@]}" "${SIZE[@]}" --device "$DEVICE" --profile \
        --profile-steps "${PROFILE_STEPS:-10}" --batch-sizes "$B_MAIN" --curvature-interval "${PROFILE_INTERVAL:-5}" \
        --optimizers "$PROFILE_OPTIMIZERS" --out "$WORK/profile-4"
fi

# 5. the paper's Table 1: the next cells of the committed plan that fit (each cell one fop-bench command;
#    a cell cut off by the limit is not recorded and runs again in the next session)
if [[ $STAGES == *" 5 "* ]]; then
    TOY_ARGS=()
    [ "$DEVICE" = cuda ] || TOY_ARGS=(--toy "${TABLE1_TOY:-2}")
    stage stage5-table1 $(($(left) - 10)) "$PYTHON" benchmarks/table1.py run \
        --plan "${TABLE1_PLAN:-results/gpu/table1/plan.json}" --data "$DATA" --device "$DEVICE" \
        --seconds $(($(left) - 25)) --out "$OUT/table1" --work "$WORK/table1" "${TOY_ARGS[@]}"
    tail -n 3 "$WORK/stage5-table1.log" | tee -a "$WORK/session.log"
fi

log "done; packing"
cp "$WORK/session.log" "$WORK/env.txt" "$OUT/" 2>/dev/null
tar czf "$OUT/gpu-session.tgz" -C "$WORK" --exclude cache .
