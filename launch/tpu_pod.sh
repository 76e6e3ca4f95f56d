#!/usr/bin/env bash
# Run dsbs-train on every worker of a Cloud TPU VM pod slice. Each worker runs
# the same command; `--multihost` lets jax.distributed find its peers, and each
# process reads only its shard of the SeqIO data. MODEL_DIR must be shared
# storage (gs://...) so that all workers write one checkpoint.
#
#   TPU_NAME=my-v4-64 ZONE=us-central2-b launch/tpu_pod.sh setup
#   TPU_NAME=my-v4-64 ZONE=us-central2-b launch/tpu_pod.sh train \
#     --gin_file=gin/train.gin --gin_file=gin/models/t5_1_1/xxl.gin --gin_file=gin/tasks/cqa.gin \
#     --gin_file=gin/runs/step_by_step.gin --gin_file=gin/vocabularies/sentencepiece.gin \
#     --gin.PARTITIONING="'fsdp'" --gin.NUM_PARTITIONS=8 --gin.DATA_ROOT="'gs://bucket/datasets'" \
#     --gin.MODEL_DIR="'gs://bucket/runs/cqa_xxl'"
#
# `setup` clones REPO_URL at REF into ~/dsbs-jax on every worker (refusing to
# replace a ~/dsbs-jax that is not a git checkout of it) and installs it.
# Check the memory plan first, on any machine: dsbs-train <same gin flags> --plan=DATAxMODEL
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_URL=${REPO_URL:-$(git config --get remote.origin.url)}
REF=${REF:-$(git rev-parse HEAD)}
action=${1:?usage: $0 setup|train [dsbs-train flags...]}
shift
q() { printf '%q' "$1"; }
case "$action" in
  setup)
    command="set -e; if [ -e ~/dsbs-jax ] && ! git -C ~/dsbs-jax remote get-url origin 2>/dev/null | grep -qxF -- $(q "$REPO_URL"); then echo '~/dsbs-jax exists and is not a checkout of '$(q "$REPO_URL") >&2; exit 2; fi; [ -d ~/dsbs-jax ] || git clone -q -- $(q "$REPO_URL") ~/dsbs-jax; cd ~/dsbs-jax && git fetch -q origin && git checkout -q $(q "$REF") && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e . 'jax[tpu]'"
    ;;
  train)
    command="cd ~/dsbs-jax && . .venv/bin/activate && dsbs-train --multihost $(printf '%q ' "$@")"
    ;;
  *)
    echo "unknown action $action: setup or train" >&2
    exit 2
    ;;
esac
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$command"
