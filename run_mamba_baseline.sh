#!/usr/bin/env bash
# Launch the Vision Mamba baseline on CIFAR-10 and/or CIFAR-100 in the background.
#
# Every setting below can be overridden from the environment, e.g.
#   RUN_CIFAR100=false GPU_CIFAR10=2 ./run_mamba_baseline.sh
#   RUN_QUICK_TEST=true ./run_mamba_baseline.sh          # 30 epochs, 3 warm-up epochs
#   RESUME=true ./run_mamba_baseline.sh                  # continue from the last checkpoints
#   ALLOW_CPU=true ./run_mamba_baseline.sh               # no GPU: run on the CPU (slow)
#   EXTRA_ARGS="--val_size 5000" ./run_mamba_baseline.sh # appended to every command (not the options this script
#                                                        # passes: --arch in it is refused, use ARCH_CIFAR10...)
#   LR=5e-4 ./run_mamba_baseline.sh                      # the recipe's numbers too (see "The guide's recipe")
#   NPROC=2 RUN_CIFAR100=false ./run_mamba_baseline.sh   # one CIFAR-10 run over GPUs 0,1 (torchrun, DDP)
#   CUDA_GRAPHS=false ./run_mamba_baseline.sh            # compile without CUDA graphs (see CUDA_GRAPHS below)
#
# The script returns at once; the runs go on under nohup. Each run writes
#   $LOG_DIR/<arch>_<dataset>_baseline_<timestamp>.log    (the trainer's log)
#   $LOG_DIR/<arch>_<dataset>_baseline_<timestamp>.jsonl  (one record per epoch)
#   $LOG_DIR/<arch>_<dataset>_baseline_<timestamp>.out    (stdout + stderr)
set -euo pipefail

# ----------------------------------------------------------------------------- settings
RUN_CIFAR10="${RUN_CIFAR10:-true}"
RUN_CIFAR100="${RUN_CIFAR100:-true}"
RUN_QUICK_TEST="${RUN_QUICK_TEST:-false}"   # true -> 30 epochs instead of EPOCHS
EPOCHS="${EPOCHS:-300}"

ARCH_CIFAR10="${ARCH_CIFAR10:-mamba_small}"
ARCH_CIFAR100="${ARCH_CIFAR100:-mamba_small}"
GPU_CIFAR10="${GPU_CIFAR10:-0}"
GPU_CIFAR100="${GPU_CIFAR100:-1}"
BATCH_SIZE="${BATCH_SIZE:-128}"

LOG_DIR="${LOG_DIR:-./logs_mamba_baseline}"
CKPT_DIR="${CKPT_DIR:-./checkpoint/mamba_baseline}"
DATA_ROOT="${DATA_ROOT:-./datasets}"
PYTHON="${PYTHON:-python3}"
ALLOW_CPU="${ALLOW_CPU:-false}"             # true -> run on the CPU when no GPU is found
EXTRA_ARGS="${EXTRA_ARGS:-}"                # appended (word-split) to each command; not options set here
RESUME="${RESUME:-false}"                   # true -> --resume auto
NPROC="${NPROC:-1}"                         # GPUs per run: >1 runs each data set over NPROC GPUs with torchrun
# CUDA graphs (--cuda_graphs) replay each compiled step instead of launching its kernels one by one: 1.22x the
# images/s at batch 128 and 257 tokens (docs/SPEED.md). auto: on for runs of one process on a GPU at BATCH_SIZE <=
# 128, unless EXTRA_ARGS turns compiling off or sets --deterministic or --accum_steps; at batch 512 they were not
# shown to help, and with several processes they are untested. true: always (one process on a GPU); false: never.
CUDA_GRAPHS="${CUDA_GRAPHS:-auto}"
RUN_ID="${RUN_ID:-$(date +%Y%m%d_%H%M%S)}"  # the logs' name part (--run_id): the launch time

# The guide's training recipe.
LR="${LR:-1e-3}"
WEIGHT_DECAY="${WEIGHT_DECAY:-0.05}"
WARMUP_EPOCHS="${WARMUP_EPOCHS:-}"          # default 20; 3 with RUN_QUICK_TEST=true
MIXUP_ALPHA="${MIXUP_ALPHA:-0.8}"
CUTMIX_ALPHA="${CUTMIX_ALPHA:-1.0}"
LABEL_SMOOTHING="${LABEL_SMOOTHING:-0.1}"

TRAIN_SCRIPT=train_mamba_baseline.py
SELF="$(basename "$0")"

die() {  # die EXIT_CODE MESSAGE
    echo "$SELF: error: $2" >&2
    exit "$1"
}

cd "$(dirname "$0")"

# ----------------------------------------------------------------------------- validation
for var in RUN_CIFAR10 RUN_CIFAR100 RUN_QUICK_TEST ALLOW_CPU RESUME; do
    case "${!var}" in
        true|false) ;;
        *) die 2 "$var must be true or false, got '${!var}'" ;;
    esac
done
case "$CUDA_GRAPHS" in
    auto|true|false) ;;
    *) die 2 "CUDA_GRAPHS must be auto, true or false, got '$CUDA_GRAPHS'" ;;
esac

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_uint "$EPOCHS" && [ "$EPOCHS" -gt 0 ] || die 2 "EPOCHS must be a positive integer, got '$EPOCHS'"
is_uint "$BATCH_SIZE" && [ "$BATCH_SIZE" -gt 0 ] || die 2 "BATCH_SIZE must be a positive integer, got '$BATCH_SIZE'"
is_uint "$NPROC" && [ "$NPROC" -gt 0 ] || die 2 "NPROC must be a positive integer, got '$NPROC'"
for var in LR WEIGHT_DECAY WARMUP_EPOCHS MIXUP_ALPHA CUTMIX_ALPHA LABEL_SMOOTHING; do
    [ -z "${!var}" ] || [[ "${!var}" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] \
        || die 2 "$var must be a number >= 0, got '${!var}'"
done
[[ "$RUN_ID" =~ ^[A-Za-z0-9._-]+$ ]] || die 2 "RUN_ID may hold only letters, digits, '.', '_' and '-', got '$RUN_ID'"

EXTRA=()
if [ -n "$EXTRA_ARGS" ]; then
    read -r -a EXTRA <<< "$EXTRA_ARGS"
fi
launcher_setting() {  # the setting of this script that passes trainer option $1 (nothing: not one it passes)
    case "$1" in
        --dataset) echo "RUN_CIFAR10 / RUN_CIFAR100" ;;
        --arch) echo "ARCH_CIFAR10 / ARCH_CIFAR100" ;;
        --epochs) echo "EPOCHS (or RUN_QUICK_TEST=true)" ;;
        --batch_size) echo "BATCH_SIZE" ;;
        --gpu) echo "GPU_CIFAR10 / GPU_CIFAR100 (NPROC for several)" ;;
        --device) echo "ALLOW_CPU=true" ;;
        --data_dir) echo "DATA_ROOT" ;;
        --save_dir) echo "CKPT_DIR" ;;
        --log_dir) echo "LOG_DIR" ;;
        --run_id) echo "RUN_ID" ;;
        --resume) echo "RESUME=true" ;;
        --lr) echo "LR" ;;
        --weight_decay) echo "WEIGHT_DECAY" ;;
        --warmup_epochs) echo "WARMUP_EPOCHS" ;;
        --mixup_alpha) echo "MIXUP_ALPHA" ;;
        --cutmix_alpha) echo "CUTMIX_ALPHA" ;;
        --label_smoothing) echo "LABEL_SMOOTHING" ;;
        --cuda_graphs) echo "CUDA_GRAPHS=true" ;;
    esac
}
# The launcher prints each run's log path and device from its own settings: the same option in EXTRA_ARGS would
# win in the trainer and make that report wrong.
for word in ${EXTRA[@]+"${EXTRA[@]}"}; do
    setting="$(launcher_setting "${word%%=*}")"
    [ -z "$setting" ] || die 2 "EXTRA_ARGS sets ${word%%=*}, which the launcher passes itself; use $setting instead"
done

DATASETS=()
[ "$RUN_CIFAR10" = true ] && DATASETS+=(cifar10)
[ "$RUN_CIFAR100" = true ] && DATASETS+=(cifar100)
[ "${#DATASETS[@]}" -gt 0 ] || die 2 "nothing to run: RUN_CIFAR10 and RUN_CIFAR100 are both false"

for ds in "${DATASETS[@]}"; do
    if [ "$ds" = cifar10 ]; then g="$GPU_CIFAR10"; else g="$GPU_CIFAR100"; fi
    is_uint "$g" || die 2 "GPU_${ds^^} must be a GPU index (0, 1, ...), got '$g'"
done

command -v "$PYTHON" >/dev/null 2>&1 || die 2 "PYTHON='$PYTHON' is not an executable command"
[ -f "$TRAIN_SCRIPT" ] || die 2 "$TRAIN_SCRIPT not found in $(pwd)"

if [ "$RUN_QUICK_TEST" = true ]; then
    EPOCHS=30
    WARMUP_EPOCHS="${WARMUP_EPOCHS:-3}"
fi
WARMUP_EPOCHS="${WARMUP_EPOCHS:-20}"

# ----------------------------------------------------------------------------- devices
NUM_GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then
    # A failing nvidia-smi (no driver, no device) counts as no GPU.
    NUM_GPUS="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ' || true)"
fi

USE_CPU=false
if [ "$NUM_GPUS" -eq 0 ]; then
    if [ "$ALLOW_CPU" = true ]; then
        USE_CPU=true
        echo "No GPU found; ALLOW_CPU=true, so the runs go on the CPU (--device cpu). This will be slow."
    else
        echo "$SELF: no GPU found (nvidia-smi missing or lists no GPU); set ALLOW_CPU=true to run on the CPU" >&2
        exit 1
    fi
elif [ "$NPROC" -gt 1 ]; then
    # Data set i takes GPUs i*NPROC .. i*NPROC+NPROC-1; GPU_CIFAR10/GPU_CIFAR100 are not used.
    need=$((NPROC * ${#DATASETS[@]}))
    [ "$need" -le "$NUM_GPUS" ] || die 2 "NPROC=$NPROC for ${#DATASETS[@]} run(s) needs $need GPUs, but only $NUM_GPUS found; nothing started"
else
    if [ "$NUM_GPUS" -eq 1 ] && [ "${#DATASETS[@]}" -eq 2 ] \
            && [ "$GPU_CIFAR10" = 0 ] && [ "$GPU_CIFAR100" = 1 ]; then
        GPU_CIFAR100=0
        echo "Only one GPU found: CIFAR-10 and CIFAR-100 both run on GPU 0, in parallel."
    fi
    for ds in "${DATASETS[@]}"; do
        if [ "$ds" = cifar10 ]; then g="$GPU_CIFAR10"; else g="$GPU_CIFAR100"; fi
        if [ "$g" -ge "$NUM_GPUS" ]; then
            die 2 "GPU_${ds^^}=$g but only $NUM_GPUS GPU(s) found (valid indices 0..$((NUM_GPUS - 1))); nothing started"
        fi
    done
fi

GRAPHS=false
if [ "$CUDA_GRAPHS" = true ]; then
    [ "$USE_CPU" = false ] || die 2 "CUDA_GRAPHS=true needs a GPU"
    [ "$NPROC" -eq 1 ] || die 2 "CUDA_GRAPHS=true needs NPROC=1 (CUDA graphs are untested with several processes)"
    GRAPHS=true
elif [ "$CUDA_GRAPHS" = auto ] && [ "$USE_CPU" = false ] && [ "$NPROC" -eq 1 ] && [ "$BATCH_SIZE" -le 128 ]; then
    GRAPHS=true
    for word in ${EXTRA[@]+"${EXTRA[@]}"}; do
        case "${word%%=*}" in
            --no_compile|--deterministic|--accum_steps) GRAPHS=false ;;
        esac
    done
fi

# ----------------------------------------------------------------------------- launch
mkdir -p "$LOG_DIR"
TS="$RUN_ID"

PIDS=()
echo "Run id: $TS   epochs: $EPOCHS   batch size: $BATCH_SIZE   resume: $RESUME"
for ds in "${DATASETS[@]}"; do
    if [ "$ds" = cifar10 ]; then
        arch="$ARCH_CIFAR10"; gpu="$GPU_CIFAR10"
    else
        arch="$ARCH_CIFAR100"; gpu="$GPU_CIFAR100"
    fi
    stem="$LOG_DIR/${arch}_${ds}_baseline_${TS}"

    if [ "$NPROC" -gt 1 ]; then
        # One run over NPROC processes (DDP): torchrun picks a free port with --standalone.
        first=$(( ${#PIDS[@]} * NPROC ))
        gpus="$(seq -s, "$first" $((first + NPROC - 1)))"
        cmd=(env "CUDA_VISIBLE_DEVICES=$gpus" "$PYTHON" -m torch.distributed.run --standalone
             --nproc_per_node "$NPROC" "$TRAIN_SCRIPT")
    else
        cmd=("$PYTHON" "$TRAIN_SCRIPT")
    fi
    cmd+=(--dataset "$ds" --arch "$arch" --epochs "$EPOCHS" --batch_size "$BATCH_SIZE")
    if [ "$USE_CPU" = true ]; then
        cmd+=(--device cpu)
        where=cpu
        [ "$NPROC" -gt 1 ] && where="cpu x$NPROC processes"
    elif [ "$NPROC" -gt 1 ]; then
        where="GPUs $gpus (torchrun, $NPROC processes)"
    else
        cmd+=(--gpu "$gpu")
        where="GPU $gpu"
    fi
    cmd+=(--data_dir "$DATA_ROOT/$ds" --save_dir "$CKPT_DIR/$ds" --log_dir "$LOG_DIR" --run_id "$TS"
          --lr "$LR" --weight_decay "$WEIGHT_DECAY" --warmup_epochs "$WARMUP_EPOCHS"
          --mixup_alpha "$MIXUP_ALPHA" --cutmix_alpha "$CUTMIX_ALPHA" --label_smoothing "$LABEL_SMOOTHING")
    [ "$RESUME" = true ] && cmd+=(--resume auto)
    [ "$GRAPHS" = true ] && cmd+=(--cuda_graphs)
    cmd+=(${EXTRA[@]+"${EXTRA[@]}"})

    PYTHONUNBUFFERED=1 nohup "${cmd[@]}" > "$stem.out" 2>&1 < /dev/null &
    pid=$!
    PIDS+=("$pid")

    echo
    echo "[$ds] arch: $arch   device: $where   PID: $pid"
    echo "    log: $stem.log"
    echo "    out: $stem.out"
    echo "    cmd: ${cmd[*]}"
done

echo
echo "Follow:  tail -f $LOG_DIR/*.log"
echo "Stop:    kill ${PIDS[*]}"
echo "Resume:  RESUME=true ./$SELF"
exit 0
