#!/usr/bin/env bash
# The GLUE table (BENCHMARKS.md "Side networks against fine-tuning"): MiniLM, dev scores at the
# setting chosen on 10% of the training set held out for validation (--valid-fraction 0.1).
#
#   bash benchmarks/glue_table.sh WORK PART [PART ...]
#
# PARTs, each resumable on its own (a finished store or run is kept):
#   stores            every task's train and dev stores (MRPC and WNLI also with --pairs separate)
#   stores-TASK       TASK's stores only (TASK without -sep: a pair task gets both)
#   side-TASK         side networks on TASK's stores: one `sidecache sweep` (3 seeds, every spec)
#   long-TASK         READ and LST on TASK's stores for twice the epochs at 1e-3 and 5e-4: its
#                     own sweep, as the task TASK-long (the table's "(long)" rows)
#   online-TASK       full fine-tuning, LoRA and MEFT on TASK: one `sidecache bench`
#   table             benchmarks.glue_table over everything under WORK -> WORK/glue.md (and
#                     .json); EARLIER=T.json adds an earlier table's cells that WORK lacks
# TASK is one of MRPC, MRPC-sep (MRPC cached with --pairs separate), CoLA, WNLI, WNLI-sep, SST-2.
# Environment: SEEDS (default 0,1,2), ONLINE_METHODS (the online part's --methods), WORKERS (the
# sweep's worker processes, default 3), EARLIER (see table), PY, GLUE.
set -euo pipefail
shopt -s nullglob  # the table part takes whichever of side/, long/ and online/ exist
WORK=${1:?usage: glue_table.sh WORK PART [PART ...]}
shift
PY=${PY:-.venv/bin/python}
GLUE=${GLUE:-../shared/data/glue}
SEEDS=${SEEDS:-0,1,2}
VALID=0.1

sidecache() { "$PY" -m stages.cli "$@"; }

epochs_of() {  # side-network epochs per task (each run keeps the epoch validation chooses)
  case $1 in SST-2) echo 3 ;; WNLI*) echo 8 ;; *) echo 4 ;; esac
}

pair_task() { case $1 in MRPC* | WNLI*) return 0 ;; *) return 1 ;; esac; }

stores() {
  local t s
  for t in "$@"; do
    for s in train dev; do
      [ -f "$WORK/stores/$t/$s/zarr.json" ] || sidecache cache --backbone minilm \
        --data "glue:$GLUE/$t" --split "$s" --out "$WORK/stores/$t/$s" --max-length 128 \
        --lst-prune 8 --pairs joint --no-progress --overwrite
      if pair_task "$t"; then
        [ -f "$WORK/stores/$t-sep/$s/zarr.json" ] || sidecache cache --backbone minilm \
          --data "glue:$GLUE/$t" --split "$s" --out "$WORK/stores/$t-sep/$s" --max-length 128 \
          --lst-prune 8 --pairs separate --no-progress --overwrite
      fi
    done
  done
}

side_specs() {
  # the probes, READ and LST (random init) at learning rates 1e-3 and 3e-3, LST from the pruned
  # backbone (init=pruned) at 3e-3; on pair tasks every network pools each sentence on its own
  # (pool=pair, their default there) and the probes also pool the pair as one (pool=mean)
  local lr p=""
  pair_task "$1" && p="pool=pair,"
  for lr in 1e-3 3e-3; do
    echo "linear:${p}lr=$lr,name=linear-$lr"
    echo "mlp:${p}lr=$lr,name=mlp-$lr"
    echo "lst:${p}lr=$lr,name=lst-$lr"
    echo "read:${p}lr=$lr,name=read-$lr"
  done
  [ -n "$p" ] && echo "linear:pool=mean,lr=3e-3,name=linear-mean-3e-3" &&
    echo "mlp:pool=mean,lr=3e-3,name=mlp-mean-3e-3"
  echo "lst:${p}init=pruned,lr=3e-3,name=lst-pruned-3e-3"
}

sweep() {  # sweep NAME TASK EPOCHS OUT: the specs on stdin, on TASK's stores, as the task NAME
  local name=$1 task=$2 epochs=$3 out=$4 spec args=()
  while read -r spec; do args+=(--sidenet "$spec"); done
  sidecache sweep --task "$name=$WORK/stores/$task/train,$WORK/stores/$task/dev" "${args[@]}" \
    --seeds "$SEEDS" --epochs "$epochs" --valid-fraction $VALID \
    --out "$out" --workers "${WORKERS:-3}" --threads 1
}

side() { sweep "$1" "$1" "$(epochs_of "$1")" "$WORK/side/$1" < <(side_specs "$1"); }

online() {  # full fine-tuning at two learning rates, LoRA and MEFT at their defaults
  local task=$1
  sidecache bench --backbone minilm --data "glue:$GLUE/$task" --out "$WORK/online/$task" \
    --epochs 3 --seeds "$SEEDS" --valid-fraction $VALID --max-length 128 \
    --methods "${ONLINE_METHODS:-online:full:lr=2e-5,online:full:lr=5e-5,online:lora,online:meft}"
}

long_specs() {  # a longer, gentler schedule for READ and LST: lr 1e-3 and 5e-4
  local lr p=""
  pair_task "$1" && p="pool=pair,"
  for lr in 1e-3 5e-4; do
    echo "lst:${p}lr=$lr,name=lst-$lr"
    echo "read:${p}lr=$lr,name=read-$lr"
  done
}

long() { sweep "$1-long" "$1" "$((2 * $(epochs_of "$1")))" "$WORK/long/$1" < <(long_specs "$1"); }

for part in "$@"; do
  case $part in
    stores) stores MRPC WNLI CoLA SST-2 ;;
    stores-*) stores "${part#stores-}" ;;
    side-*) side "${part#side-}" ;;
    long-*) long "${part#long-}" ;;
    online-*) online "${part#online-}" ;;
    table) "$PY" -m benchmarks.glue_table "$WORK/glue.md" "$WORK"/side/* "$WORK"/long/* \
      "$WORK"/online/* ${EARLIER:-} ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
