#!/usr/bin/env bash
# Fine-tune one data2vec row of Table 1 (arXiv 2202.03555) on ImageNet-1k, then test and write its record.
#
#   experiments/table1/launch.sh vit_b                       # this node, 8 GPUs, torchrun
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 experiments/table1/launch.sh vit_l   # on host0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=host0 experiments/table1/launch.sh vit_l   # on host1
#   sbatch --nodes=1 experiments/table1/launch.sh vit_b      # SLURM, 1 node x 8 GPUs
#   sbatch --nodes=2 experiments/table1/launch.sh vit_l      # SLURM, 2 nodes x 8 GPUs
#   RESUME=1 ...                                             # continue from the run's last.ckpt
#   CHECKPOINT_EVERY=1000 ...                                # a checkpoint every 1000 optimizer steps
#                                                            # (default 500; 0 keeps epoch-end ones only)
#
# Extra arguments go to `d2v-eval fit`, e.g. `--trainer.precision bf16-mixed`.
# The global batch stays 1024 whatever the node and GPU counts: gradient accumulation is derived
# from global_batch_size, so fewer GPUs give the same recipe, only slower.
#
# Lightning picks the cluster environment by itself: SLURMEnvironment inside `srun` (one task per
# GPU), TorchElasticEnvironment under torchrun.
#SBATCH --job-name=d2v-table1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=72:00:00
#SBATCH --output=runs/slurm-%j.out
set -euo pipefail

row="${1:-}"
case "$row" in
  vit_b|vit_l) shift ;;
  *) echo "usage: $0 vit_b|vit_l [d2v-eval fit arguments...]" >&2; exit 2 ;;
esac

# Under sbatch the script runs from a spool copy: find the repository from the submit directory.
repo="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
cd "$repo"
config="configs/table1/data2vec_${row}_finetune.yaml"
run_args=()
if [[ "${RESUME:-0}" == 1 ]]; then
  run_args=(--ckpt_path last)
fi
# Mid-epoch checkpoints bound the work an interruption loses; a resume from one is exact.
every="${CHECKPOINT_EVERY:-500}"
if [[ "$every" != 0 ]]; then
  step_checkpoints='{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",'
  step_checkpoints+=' "init_args": {"every_n_train_steps": '"$every"', "save_last": true}}'
  run_args+=("--trainer.callbacks+=$step_checkpoints")
fi

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  gpus_per_node="${SLURM_NTASKS_PER_NODE:-8}"
  exec srun d2v-eval fit --config "$config" \
    --trainer.num_nodes "$SLURM_JOB_NUM_NODES" --trainer.devices "$gpus_per_node" \
    "${run_args[@]}" "$@"
fi

nnodes="${NNODES:-1}"
gpus_per_node="${GPUS_PER_NODE:-8}"
exec torchrun --nnodes "$nnodes" --nproc_per_node "$gpus_per_node" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m d2v_eval.cli fit --config "$config" \
  --trainer.num_nodes "$nnodes" --trainer.devices "$gpus_per_node" \
  "${run_args[@]}" "$@"
