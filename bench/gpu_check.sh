#!/usr/bin/env bash
# The one device command for issue 9, from the repository root on the GPU machine:
#
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# 1. installs the carried wheels (.whl: monai, nibabel, pydicom; the image has torch, numpy,
#    scipy, scikit-image, numba, tensorboard, tqdm, pyyaml, pytest) into /tmp/site;
# 2. prints nvidia-smi and the versions, and whether numba works (else the bench builds the
#    region cache with skimage's Felzenszwalb);
# 3. the CUDA tests of the augmentation and the training helpers (short);
# 4. bench/throughput.py --preset h100 -> $OUT/throughput_h100.json (rewritten per row);
# 5. if time is left: a short real `lrcseg pretrain` through the CLI on GPU phantoms.
# Everything is tee'd to $OUT/gpu_log.txt. Total wall time stays under ~9.5 minutes.
set -u -o pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_log.txt") 2>&1
T0=$(date +%s)
left() { echo $((570 - ($(date +%s) - T0))); }

echo "== install carried wheels"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1

echo "== machine"
nvidia-smi
python3 - <<'EOF'
import importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("numpy", "monai", "nibabel", "pydicom", "scikit-image", "numba", "llvmlite",
             "tensorboard", "tqdm", "pyyaml", "scipy"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} ABSENT")
try:
    import numba, numpy as np
    print("numba njit works:", numba.njit(lambda a: a.sum())(np.arange(4)) == 6)
except Exception as exc:  # the bench falls back to skimage's Felzenszwalb
    print("numba unusable:", type(exc).__name__, exc)
import lrcseg, lrcseg.train.pretrain  # noqa: F401  (the package imports from src)
print("lrcseg", lrcseg.__version__, "imports")
EOF

echo "== CUDA tests (augmentation, training helpers)  [$(left) s left]"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_augment.py tests/test_train_common.py -k cuda

echo "== throughput, preset h100  [$(left) s left]"
timeout $(( $(left) - 60 )) python3 bench/throughput.py --preset h100 --out "$OUT/throughput_h100.json"
echo "throughput exit code $?"

if [ "$(left)" -gt 75 ]; then
    echo "== CLI: lrcseg phantoms + pretrain on GPU  [$(left) s left]"
    rm -rf /tmp/cli_phantoms /tmp/cli_run
    timeout $(( $(left) - 10 )) bash -c '
        python3 -m lrcseg phantoms --out /tmp/cli_phantoms --cases 6 --preset small &&
        python3 -m lrcseg pretrain --data /tmp/cli_phantoms --out /tmp/cli_run --steps 40 \
            --batch-size 64 --workers 8 --backbone resnet50 --no-progress \
            --cache-dir /tmp/cli_cache'
    echo "cli exit code $?"
    if [ -f /tmp/cli_run/metrics.jsonl ]; then
        cp /tmp/cli_run/metrics.jsonl "$OUT/cli_metrics.jsonl"
        tail -n 3 /tmp/cli_run/metrics.jsonl
    fi
else
    echo "== CLI pretrain skipped: $(left) s left"
fi
echo "== done in $(( $(date +%s) - T0 )) s"
