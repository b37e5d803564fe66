#!/bin/bash
# collect.sh SRC DST: copy an experiment folder's small, committable results (no checkpoints)
set -euo pipefail
src=$1; dst=$2
cd "$src"
find . \( -path './phantoms' -o -path './locks' \) -prune -o -type f \( -name experiment.yaml -o -name initialisations.yaml -o -name report.md -o -name results.csv -o -name probe_results.csv -o -name timings.json -o -path './figures/*.png' -o -path './runs/finetune/*/*/metrics.json' -o -path './runs/finetune/*/*/metrics_step*.json' -o -path './runs/finetune/*/*/split.json' -o -path './runs/probe/*/*/metrics.json' -o -path './runs/pretrain/*/config.yaml' -o -path './runs/pretrain/*/metrics.jsonl' -o -path './runs/pretrain/*/run_card.json' \) -print | while read -r f; do
  mkdir -p "$dst/$(dirname "$f")"; cp "$f" "$dst/$f"
done
