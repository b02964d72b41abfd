"""Text sources for calibration and evaluation (no model knowledge)."""

from .calibration import CalibConfig, calibration_batches, load_text, token_stream

__all__ = ["CalibConfig", "calibration_batches", "load_text", "token_stream"]
