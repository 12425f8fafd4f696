#!/usr/bin/env bash
# Set up (or refresh) the virtualenv, then run the main job end to end on a real zoo model:
# inspect ResNet-50, convert its BatchNorm to GroupNorm + weight standardization, save it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
NS=(.venv/bin/normsurgeon)
set -x
"${NS[@]}" inspect torchvision:resnet18
"${NS[@]}" convert torchvision:resnet50 --to gn+ws -o out/resnet50_gnws.pt --force --verify
