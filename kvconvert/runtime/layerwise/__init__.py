"""Layer-by-layer execution of a checkpoint (one decoder layer in memory), shared by every pass that runs
the model on data: evaluation, the calibrated GQA fit, fit-latent."""

from .executor import BatchState, LayerwiseModel, checkpoint_dtype, resolve_device
from .footprint import layerwise_bytes

__all__ = ["BatchState", "LayerwiseModel", "checkpoint_dtype", "layerwise_bytes", "resolve_device"]
