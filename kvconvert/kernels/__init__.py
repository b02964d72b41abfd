"""Kernels: leaves that import only torch/triton. Each Triton kernel sits beside an eager reference."""
