#!/usr/bin/env bash
# Rebuild every committed table and plot in results/demo/ from the records in results/records/demo/.
#   results/regenerate.sh           # tables and plots from the committed records
#   results/regenerate.sh --rerun   # first run both demo configs again and add their records, then rebuild
# Timing on an idle 2-core machine: --rerun took 3.4 minutes in all (both demo runs, then the rebuild,
# which spends most of its time importing the package once per report call).
# Set D2V_EVAL to the command to use (default: d2v-eval), e.g. D2V_EVAL="python -m d2v_eval.cli".
set -euo pipefail
cd "$(dirname "$0")/.."

d2v_eval=${D2V_EVAL:-d2v-eval}
records=results/records/demo
out=results/demo

if [[ "${1:-}" == "--rerun" ]]; then
  # One run at a time: the demo runs use every core they get.
  for config in configs/demo_linear_probe.yaml configs/demo.yaml; do
    $d2v_eval fit --config "$config" --recorder.records_dir="$records" \
      --trainer.logger.init_args.save_dir="$records/tensorboard" \
      --trainer.enable_progress_bar=false --recorder.tags='[demo, random-init]'
  done
  # Checkpoints are large and not needed for tables or curves.
  find "$records/tensorboard" -name '*.ckpt' -delete
elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--rerun]" >&2
  exit 2
fi

$d2v_eval report --records_dir "$records" --table runs --output "$out/runs.md"
for table in table1 transfer; do
  for format in markdown csv latex json; do
    case $format in markdown) ext=md ;; csv) ext=csv ;; latex) ext=tex ;; json) ext=json ;; esac
    $d2v_eval report --records_dir "$records" --table "$table" --format "$format" --output "$out/$table.$ext"
  done
done
$d2v_eval report --records_dir "$records" --plot transfer --out "$out/plots"
$d2v_eval report --records_dir "$records" --plot curves --out "$out/plots"
