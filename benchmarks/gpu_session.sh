#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one batch (a lent GPU machine's time is short).
#
#   bash benchmarks/gpu_session.sh OUT_DIR [DATA_DIR]
#
# Runs, each with its own time limit, writing one log per part into OUT_DIR:
#   gpu-tests.log  the tests marked gpu: the layer invariants on CUDA tensors, merges under
#                  16-mixed and bf16-mixed autocast, device-resident data, and the CLI fine-tunes
#                  (gpu.yaml + bf16.yaml, 16-mixed, DDP on 1 device, FSDP with configure_model())
#                  with their adapter-only resumes
#   train.log      benchmarks/train.py --epoch: whole MNIST epochs, pretraining and LoRA, data on
#                  the host or the device, batch 10 to 4096, fp32 and bf16-mixed, and the bare loop
#   layer.log      benchmarks/layer.py on CUDA (fp32 with the custom-Function measurement, bf16)
#   inference.log  benchmarks/inference.py on CUDA (fp32, bf16)
#   cli.log        the demo's commands on the GPU: pretrain, LoRA fine-tune, test (bf16, data on the GPU)
# A machine without the package's dependencies gets them from ./.gpu/whl (jsonargparse & co),
# and MNIST from ./.gpu/mnist.tgz when DATA_DIR holds none.
# DEVICE=cpu runs the same parts on the CPU (a dry run of this script; the tests then skip).
# Exits 1 if any part failed or ran out of time (each part's log ends with its exit code).
set -u
OUT=${1:?usage: gpu_session.sh OUT_DIR [DATA_DIR]}
DATA=${2:-data}
DEV=${DEVICE:-cuda}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
PY=${PYTHON:-python3}

if ls .gpu/whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [ ! -e "$DATA/MNIST/raw/train-images-idx3-ubyte" ] && [ -f .gpu/mnist.tgz ]; then
  mkdir -p /tmp/mnist && tar xzf .gpu/mnist.tgz -C /tmp/mnist && DATA=/tmp/mnist
fi

FAILED=0
part() {  # part NAME SECONDS COMMAND...: run with a limit, log to OUT/NAME.log, note the time
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "\$ $*" >"$OUT/$name.log"
  timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
  local rc=$?
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
  echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/$name.log"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, lightning, torchmetrics, sys; print(sys.version.split()[0], 'torch', torch.__version__, \
'lightning', lightning.__version__, 'torchmetrics', torchmetrics.__version__, torch.cuda.get_device_name())"
  $PY -m pip list 2>/dev/null | grep -iE "^(peft|transformers|jsonargparse|safetensors) "
} >"$OUT/env.log" 2>&1

# Warnings are listed rather than fatal here: the machine's library versions differ from CI's.
PARALLEL=$($PY -c "import xdist" 2>/dev/null && echo "-n 4")
part gpu-tests "${GPU_TESTS_LIMIT:-200}" $PY -m pytest -m gpu -q -W default $PARALLEL -p no:cacheprovider tests
part train "${TRAIN_LIMIT:-130}" $PY benchmarks/train.py --epoch --device "$DEV" --data-dir "$DATA" \
  --batches ${BATCHES:-10 256 1024 4096} --precisions 32-true bf16-mixed
part layer "${LAYER_LIMIT:-90}" bash -c "$PY benchmarks/layer.py --device $DEV --quick && \
  $PY benchmarks/layer.py --device $DEV --quick --precision bf16-mixed"
part inference "${INFERENCE_LIMIT:-40}" bash -c "$PY benchmarks/inference.py --device $DEV --rounds 7 && \
  $PY benchmarks/inference.py --device $DEV --rounds 7 --precision bf16-mixed"
# The demo runs in a folder of its own under OUT (never the repository's runs/); real MNIST needed.
REPO=$PWD
DATA=$(cd "$DATA" && pwd)
if [ "$DEV" = cuda ]; then OVERLAY=(-c "$REPO/configs/gpu.yaml"); else OVERLAY=(--trainer.accelerator cpu); fi
GPU_RUN=("${OVERLAY[@]}" -c "$REPO/configs/bf16.yaml" --data.device_resident true --data.data_dir "$DATA"
  --trainer.enable_progress_bar false)
mkdir -p "$OUT/demo"
part cli "${CLI_LIMIT:-90}" bash -c "set -e; cd '$OUT/demo'; \
  time $PY -m lightning_lora.cli fit -c $REPO/configs/pretrain.yaml ${GPU_RUN[*]}; \
  time $PY -m lightning_lora.cli fit -c $REPO/configs/finetune_lora.yaml ${GPU_RUN[*]}; \
  time $PY -m lightning_lora.cli test -c $REPO/configs/finetune_lora.yaml ${GPU_RUN[*]} --ckpt_path runs/finetune_lora"
rm -rf "$OUT/demo"  # its checkpoints would not come back from a lent machine anyway
[ "$FAILED" = 0 ] || { echo "$FAILED part(s) failed or ran out of time: see their logs" >&2; exit 1; }
