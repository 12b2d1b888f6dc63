"""Deployable artifacts of a checkpoint: ONNX / ONNX Runtime INT8 / TorchScript export, inference, timing."""
