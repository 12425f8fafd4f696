#!/usr/bin/env bash
# Set up (or refresh) the virtualenv, then run the main job end to end on a real zoo model:
# inspect ResNet-18; convert ResNet-50's BatchNorm to GroupNorm + weight standardization and save it;
# fold it for deployment and export a verified ONNX graph. Then a trained model: the digits CNN with
# BatchNorm, converted to GN+WS (its accuracy drops), distilled back from the original on unlabelled
# digits, and evaluated against the original.
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
.venv/bin/python examples/digits_teacher.py out/digits_bn.pt
"${NS[@]}" evaluate out/digits_bn.pt --data digits:test
"${NS[@]}" convert out/digits_bn.pt --to gn+ws -o out/digits_gnws.pt --input-shape 2,1,16,16 --force
"${NS[@]}" evaluate out/digits_gnws.pt --data digits:test --teacher out/digits_bn.pt
"${NS[@]}" distill out/digits_gnws.pt --teacher out/digits_bn.pt --data digits:train --steps 600 --threads 1 -o out/digits_healed.pt --force
"${NS[@]}" evaluate out/digits_healed.pt --data digits:test --teacher out/digits_bn.pt
