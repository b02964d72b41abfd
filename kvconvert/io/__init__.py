"""Checkpoint I/O: knows files and tensors, not architectures."""

from .output_dir import atomic_output_dir, check_target
from .reader import CheckpointReader
from .result import PassResult
from .sources import ModelSource, resolve_source
from .writer import ShardedWriter, copy_side_files, parse_size

__all__ = ["CheckpointReader", "PassResult", "ModelSource", "ShardedWriter", "atomic_output_dir", "check_target",
           "copy_side_files", "parse_size", "resolve_source"]
