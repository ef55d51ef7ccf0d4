#!/usr/bin/env bash
# Smoke test of the device paths: AMP (fp16 + GradScaler, bf16), channels_last, NCCL (torchrun over
# all visible GPUs), SyncBN, sharded kNN, linear evaluation and fine-tuning, on a generated image folder.
# On a GPU machine it exercises CUDA; on a CPU-only machine the same commands run in fp32 with gloo
# (2 processes), which is how it is checked here.
#
#   bash scripts/smoke_gpu.sh [OUT_DIR]        (default: /tmp/ssl_smoke)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${1:-/tmp/ssl_smoke}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
NPROC=$(( NGPU > 1 ? NGPU : 2 ))
# one process per GPU; the per-process batch stays 16 whatever the count
B=$(( 16 * NPROC ))
rm -rf "$OUT" && mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
$PY -c "from src.data.builtin import make_synthetic_folder as m; m('$OUT/data', num_classes=8, train_per_class=$(( 4 * B / 8 )), val_per_class=8, size=64)"
run() { echo "+ $*"; "$@" 2>&1 | grep -E "INFO (processes|epoch [0-9]+:|epoch [0-9]+ kNN)|NN classifier|best_acc1|error|Error" || true; }
TR="$PY -m torch.distributed.run --standalone --nproc_per_node $NPROC"
COMMON="--image_size 64 -j 2 --print-freq 2"

# MoCo v2: single process fp16, bf16 and channels_last; then DDP (NCCL on GPU) with the kNN monitor
run $PY main_moco.py -a resnet18 -b 16 --mlp --aug-plus --cos --moco-k 256 --epochs 1 $COMMON --use_fp16 --output_dir "$OUT/moco_fp16" "$OUT/data"
run $PY main_moco.py -a resnet18 -b 16 --mlp --aug-plus --cos --moco-k 256 --epochs 1 $COMMON --bf16 --channels_last --output_dir "$OUT/moco_bf16" "$OUT/data"
run $TR main_moco.py -a resnet18 -b $B --mlp --aug-plus --cos --moco-k 256 --epochs 2 $COMMON --use_fp16 --knn_freq 1 --output_dir "$OUT/moco_ddp" "$OUT/data"
# the PIL reference pipeline on the GPU (the runs above and below take the fast path: --fast_aug auto)
run $PY main_moco.py -a resnet18 -b 16 --mlp --aug-plus --cos --moco-k 256 --epochs 1 $COMMON --fast_aug off --output_dir "$OUT/moco_pil" "$OUT/data"
# LORAC with SyncBN and fp16 across the switch
run $TR main_lorac.py --data_path "$OUT/data/train" --nmb_crops 3 2 --size_crops 64 32 --min_scale_crops 0.14 0.05 \
    --max_scale_crops 1. 0.14 --crops_for_assign 0 1 --moco-k 256 --mlp true --epochs 2 --batch_size 16 --base_lr 1.8 \
    --final_lr 0.018 --warmup_epochs 0 --arch mocom_r18 --use_fp16 true --sync_bn pytorch --epoch_lorac_starts 1 \
    --workers 2 --print_freq 2 --dump_path "$OUT/lorac"
# SogCLR (global batch) with fp16
run $TR main_sogclr.py --data "$OUT/data" --data_name custom -a resnet18 -b $B --lr 0.075 --epochs 2 --workers 2 \
    --image_size 64 --print-freq 2 --output_dir "$OUT/sogclr"
# CaCo (ad_init through the engine step, memory update) with fp16; DisCo with the DDP MoCo checkpoint as teacher
run $TR main_caco.py --data "$OUT/data" -a resnet18 --batch_size $B --cluster 256 --moco_dim 64 --mlp_dim 256 \
    --epochs 2 --warmup_epochs 1 --ad_init 1 --knn_freq 1 --workers 2 --image_size 64 --print_freq 2 --use_fp16 \
    --output_dir "$OUT/caco"
run $TR main_disco.py -a efficientb0 --teacher_arch resnet18 --teacher "$OUT/moco_ddp/checkpoint_0001.pth.tar" \
    -b $B --mlp --aug-plus --cos --moco-k 256 --epochs 1 $COMMON --use_fp16 --output_dir "$OUT/disco" "$OUT/data"
# evaluation of the DDP MoCo checkpoint (the linear probe with fp16)
run $TR eval_knn.py -a resnet18 --pretrained "$OUT/moco_ddp/checkpoint_0001.pth.tar" --image_size 64 -j 2 --nb_knn 10 20 "$OUT/data"
run $TR eval_linear.py -a resnet18 --pretrained "$OUT/moco_ddp/checkpoint_0001.pth.tar" --image_size 64 -j 2 \
    --epochs 2 -b $B --lr 1.0 --cos --use_fp16 --dump_path "$OUT/linear" "$OUT/data"
# semi-supervised fine-tuning of the whole network (DDP, fp16, SyncBN on GPU) on a class-balanced half
run $TR eval_semi.py -a resnet18 --pretrained "$OUT/moco_ddp/checkpoint_0001.pth.tar" --image_size 64 -j 2 \
    --fraction 0.5 --class_balanced --epochs 2 -b $B --lr 0.01 --use_fp16 --sync_bn pytorch --dump_path "$OUT/semi" "$OUT/data"
# data-path benchmark: reference vs fast worker half, and the device half's cost on the GPU
$PY scripts/benchmark_data.py --images 48 --repeats 3
# training-step speed of every method (README "Performance"): on GPU ResNet-50 at 224 px, batch 64, fp16,
# channels_last, PASS/FAIL against the < 10 % outside-backbone target; on the CPU a tiny run of the same code
if [ "$NGPU" -gt 0 ]; then BT=""; else BT="--image_size 32 --batch_size 8 --warmup 1 --iters 2 --kmeans_images 2000"; fi
echo "+ scripts/benchmark_train.py $BT"; $PY scripts/benchmark_train.py $BT --csv "$OUT/benchmark_train.csv"
for f in moco_fp16/checkpoint_0000.pth.tar moco_pil/checkpoint_0000.pth.tar moco_bf16/checkpoint_0000.pth.tar moco_ddp/checkpoint_0001.pth.tar \
         lorac/checkpoint.pth.tar caco/checkpoint_best.pth.tar disco/checkpoint_0000.pth.tar linear/results.json \
         semi/results.json benchmark_train.csv; do
  [ -f "$OUT/$f" ] || { echo "smoke: missing $OUT/$f"; exit 1; }
done
ls "$OUT"/sogclr/checkpoint_0001.pth.tar >/dev/null
echo "smoke: OK ($NGPU GPUs, $NPROC processes)"
