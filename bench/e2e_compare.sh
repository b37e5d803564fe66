#!/usr/bin/env bash
# Device check: the end-to-end pre-training loop (bench/throughput.py's e2e configuration,
# h100 setting: ResNet-50, 224 px, batch 128) for the code in .baseline/src (the previous
# commit, carried) and in src, in one run on one machine, so the two rates compare as a ratio.
#   run(command="bash bench/e2e_compare.sh", carry=[".whl", ".baseline"], timeout_s=420)
# VARIANTS="name:src_path:workers ..." overrides the default list.
set -u -o pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/e2e_log.txt") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
for variant in ${VARIANTS:-baseline:.baseline/src:8 compact:src:8 compact_w14:src:14}; do
    IFS=: read -r name src workers <<< "$variant"
    echo "== $name ($src, $workers workers)"
    PYTHONPATH=/tmp/site:$PWD/$src timeout 150 python3 - "$name" "$workers" "$OUT" <<'PY'
import dataclasses, json, sys, tempfile
from pathlib import Path
sys.path.insert(0, "bench")
import torch
from throughput import PRESETS, run_e2e
import lrcseg
name, workers, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
preset = PRESETS["h100"]
e2e = dataclasses.replace(preset.e2e, workers=workers)
row = run_e2e(preset.settings[0], e2e, torch.device("cuda"), Path(tempfile.mkdtemp()))
row.update(variant=name, lrcseg=str(Path(lrcseg.__file__).parent),
           pairs_per_s=round(preset.settings[0].batch / row["step_s_mean"], 1))
print(json.dumps(row))
with open(out / "e2e_compare.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
PY
done
