#!/usr/bin/env bash
# FusionBench in its own virtual environment, for benchmarks/fusionbench_parity.py only: the project
# never imports fusion_bench. The venv sees the system's packages, so it reuses the pinned torch and
# torchvision (requirements.txt); the dry run below refuses to go on if pip would replace them.
#   bash benchmarks/fusionbench_env.sh            # creates .venv-fusionbench/ at the repository root
#   FUSIONBENCH_VENV=/some/dir bash benchmarks/fusionbench_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FUSIONBENCH_VENV:-.venv-fusionbench}"
PY="${PYTHON:-python3}"
# fusion-bench 0.2.33 imports transformers.models.clip.modeling_clip.CLIPVisionTransformer, which
# transformers 5 removed: the venv gets its own transformers 4.x (the system's 5.x stays ours).
PACKAGES=("fusion-bench==0.2.33" "transformers<5" "datasets" "torch==2.14.1" "torchvision==0.29.1")

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
plan="$("$VENV/bin/pip" install --dry-run "${PACKAGES[@]}" 2>&1)" || { echo "$plan"; exit 1; }
would="$(echo "$plan" | grep '^Would install' || true)"
if echo "$would" | grep -Eq '(^| )(torch|torchvision|nvidia-[a-z0-9-]+)-[0-9]'; then
  echo "refusing: pip would install another torch/torchvision: $would" >&2
  exit 1
fi
echo "${would:-nothing to install}"
"$VENV/bin/pip" install "${PACKAGES[@]}"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
import torch, fusion_bench  # noqa: F401  (the import is the check)
print("fusion-bench", m.version("fusion-bench"), "| torch", torch.__version__,
      "| transformers", m.version("transformers"), "| datasets", m.version("datasets"))
PY
