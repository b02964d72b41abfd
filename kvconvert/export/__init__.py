"""Export: ONNX, TensorRT engines, Triton repositories. May use runtime and kernels."""
