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
# 5. if time is left: bench/unet_vs_intervals.py (issue 3's U-Net vs intensity criterion) on GPU.
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

if [ "$(left)" -gt 60 ]; then
    echo "== issue 3 criterion: U-Net (2 labelled phantoms) vs intensity intervals  [$(left) s left]"
    timeout $(( $(left) - 10 )) python3 bench/unet_vs_intervals.py --work /tmp/uvi --cases 8 \
        --steps 600 --image-size 128 --batch-size 16 --spacing 2.0 --device cuda \
        --json "$OUT/unet_vs_intervals_h100.json"
    echo "unet_vs_intervals exit code $?"
else
    echo "== unet_vs_intervals skipped: $(left) s left"
fi
echo "== done in $(( $(date +%s) - T0 )) s"
