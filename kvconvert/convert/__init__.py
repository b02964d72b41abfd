"""Conversion passes: know checkpoints and adapters, nothing of deployment."""
