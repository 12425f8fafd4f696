#!/usr/bin/env bash
# Set up (or refresh) the virtualenv, then run the main job end to end on a real zoo model:
# inspect ResNet-18; convert ResNet-50's BatchNorm to GroupNorm + weight standardization and save it;
# fold it for deployment and export a verified ONNX graph.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
NS=(.venv/bin/normsurgeon)
set -x
"${NS[@]}" inspect torchvision:resnet18
"${NS[@]}" convert torchvision:resnet50 --to gn+ws -o out/resnet50_gnws.pt --force --verify
"${NS[@]}" fold out/resnet50_gnws.pt -o out/resnet50_deploy.pt --force --verify
"${NS[@]}" export out/resnet50_deploy.pt -o out/resnet50_deploy.onnx --force --verify
