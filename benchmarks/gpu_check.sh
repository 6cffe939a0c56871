#!/usr/bin/env bash
# The GPU check: on one GPU (about 8 minutes on an H200), the distributed paths the
# CPU tests cannot run, with the figures the project is judged by.
#
#   bash benchmarks/gpu_check.sh [WORKDIR]          # on a GPU machine (default runs/gpu-check)
#   bash benchmarks/gpu_check.sh --cpu [WORKDIR]    # dry run of every step on CPU (gloo, tiny sizes)
#
# 1. a random 0.9B-teacher / 0.17B-student task at vocabulary 32000 (nothing downloaded)
# 2. `cache build` in bf16 under `torchrun --nproc_per_node 1` (NCCL process group,
#    cuda:LOCAL_RANK; default union support, lockstep), then the bare forwards of the
#    same checkpoints for the ratio
# 3. `train` under torchrun with --parallel ddp and --parallel fsdp (bf16 compute,
#    fp32 reduce): tokens/s, MFU, peak GPU memory
# 4. online Delta-KD P1 with both teachers and the student base in memory (peak memory)
# 5. loader throughput, as headroom over the student's consumption
# Prints a table and ends with one JSON line (benchmarks/gpu_check.py report).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=gpu
if [ "${1:-}" = "--cpu" ]; then mode=cpu; shift; fi
W="${1:-runs/gpu-check}"
PY="${PYTHON:-python}"
if [ "$mode" = gpu ]; then
    DEV=cuda; DT=bfloat16; SIZE=h200; BF16=--bf16; STEPS=30; BT=16384; TO=150
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible: run with --cpu for the dry run")'
else
    DEV=cpu; DT=float32; SIZE=cpu; BF16=; STEPS=3; BT=1024; TO=300
    export DELTAKD_BACKEND=gloo  # the torchrun path, on gloo
fi
mkdir -p "$W"
TR=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1)
t() { echo; echo "== $*"; }

t "task ($SIZE)"
"$PY" -m benchmarks.gpu_check task --root "$W" --size "$SIZE" >/dev/null
w() { "$PY" -c "import json,sys; print(json.load(open('$W/task.json'))['$1'])"; }

t "cache build under torchrun (device $DEV, $DT)"
rm -rf "$W/cache"
s=$(date +%s.%N)
timeout "$TO" "${TR[@]}" -m deltakd.cli cache build --teacher-ft "$(w teacher_ft)" --teacher-base "$(w teacher_base)" \
    --student-base "$(w student_base)" --data "$(w data)" --out "$W/cache" --dtype float16 \
    --model-dtype "$DT" --device "$DEV" --batch-size 16 --max-length 512 --shard-tokens 65536
"$PY" -c "import json; json.dump({'seconds': $(date +%s.%N) - $s}, open('$W/build_wall.json', 'w'))"
timeout "$TO" "$PY" -m benchmarks.gpu_check bare --root "$W" --device "$DEV" --dtype "$DT" --batch-size 16 --max-length 512

for par in ddp fsdp; do
    t "train --parallel $par under torchrun"
    rm -rf "$W/train-$par"
    timeout "$TO" "${TR[@]}" -m deltakd.cli train --cache "$W/cache" --student "$(w student_base)" --out "$W/train-$par" \
        --loss p1 --device "$DEV" --parallel "$par" $BF16 --max-steps "$STEPS" --batch-tokens "$BT" --log-every 5 \
        --eval-percent 1 --eval-batches 2 --save-every 100000 --warmup-steps 2
done

t "online Delta-KD P1, teachers in memory"
timeout "$TO" "$PY" -m benchmarks.gpu_check online --root "$W" --device "$DEV" --steps 10 --batch-tokens "$BT"
t "loader"
"$PY" -m benchmarks.gpu_check loader --root "$W" --batch-tokens "$BT" --device "$DEV"
t "report"
"$PY" -m benchmarks.gpu_check report --root "$W"
