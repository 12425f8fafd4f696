"""Deployment: ONNX export with graph optimization and checks, ONNX Runtime sessions, benchmarking."""
