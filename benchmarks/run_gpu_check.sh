#!/usr/bin/env bash
# The device check as one prepared command (issue 12 §5), for a GPU machine without open_clip:
#   here:   the wheels in .whl/ (README "GPU": the pip download command; gitignored)
#   there:  bash benchmarks/run_gpu_check.sh [--key=value ...]     (the device tool: carry [".whl"])
# Installs the carried wheels (open_clip_torch 3.3.0 and the one dependency that image lacks,
# ftfy with wcwidth; torch, torchvision, regex, tqdm, huggingface_hub, safetensors and timm are
# there) when open_clip is missing, prints the GPU, and runs gpu_check.py under a hard timeout a
# little past its own 7.5-minute guard. Table, JSON and log go to $OUT (else benchmarks/.gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-benchmarks/.gpu_check}"
mkdir -p "$out_dir"
if ! python3 -c "import open_clip" 2>/dev/null; then
    ls .whl/open_clip_torch-*.whl >/dev/null 2>&1 || { echo "no open_clip here and no .whl/open_clip_torch-*.whl to install"; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out_dir/nvidia_smi.txt"
python3 -c "import torch, open_clip; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'open_clip', open_clip.__version__)"
PYTHONUNBUFFERED=1 timeout -k 10 480 python3 benchmarks/gpu_check.py --out="$out_dir/gpu_check.json" "$@" 2>&1 \
    | tee "$out_dir/gpu_check.log"
rc=${PIPESTATUS[0]}
python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['markdown'])" "$out_dir/gpu_check.json" \
    > "$out_dir/gpu_check.md" 2>/dev/null || true
exit "$rc"
