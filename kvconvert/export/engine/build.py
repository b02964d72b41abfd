"""`export_engine(onnx_dir, cfg, out)`: parse the exported ONNX, bind KVAttention / KVLatentAttention to our plugin
(or let TensorRT's own layers take a standard-op graph), build a plan with a prefill and a decode optimization
profile, write model.plan + kvconvert.json (+ tokenizer files)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ...errors import PassFailed, UserError
from ...io import PassResult, atomic_output_dir, copy_side_files, provenance
from ...io.hashing import file_sha256
from .backend import import_backend, version
from .config import RTX_TARGETS, EngineConfig
from .profiles import Profile, engine_profiles
from .standard import attention_mode, cache_update_aliases, check_standard_graph, decompose_attention, layer_counts

log = logging.getLogger(__name__)
PLAN_FILE = "model.plan"
DEFAULT_RTX_TARGETS = ["SM80", "SM86", "SM89", "SM120"]


def read_onnx_metadata(onnx_dir: Path) -> dict[str, Any]:
    """The `kvconvert` metadata JSON of `onnx_dir/model.onnx` (UserError if it is not a kvconvert export)."""
    import onnx

    path = Path(onnx_dir) / "model.onnx"
    if not path.is_file():
        raise UserError(f"{onnx_dir} has no model.onnx; export one first with: kvconvert export onnx MODEL --out DIR")
    model = onnx.load(str(path), load_external_data=False)
    meta = next((p.value for p in model.metadata_props if p.key == "kvconvert"), None)
    if meta is None:
        raise UserError(f"{path} carries no 'kvconvert' metadata; engines are built from `kvconvert export onnx` "
                        "output only")
    return json.loads(meta)


def cache_aliases(meta: dict[str, Any]) -> dict[str, str]:
    """{present_*: past_*} of every cache buffer (KV or latent), from the metadata's cache record."""
    buffers = meta.get("cache", {}).get("buffers")
    if buffers:
        return {b["present"]: b["past"] for b in buffers}
    return {f"present_{k}_{i}": f"past_{k}_{i}" for i in range(int(meta["num_layers"])) for k in ("key", "value")}


def op_type(meta: dict[str, Any]) -> str:
    return meta.get("attention", {}).get("op_type", "KVAttention")


def _check_config(cfg: EngineConfig, meta: dict[str, Any]) -> None:
    if cfg.plugin == "aot" and cfg.backend != "tensorrt":
        raise UserError("--plugin aot needs --backend tensorrt (TensorRT-RTX has no tensorrt.plugin AOT support)")
    if cfg.plugin == "aot" and op_type(meta) == "KVLatentAttention":
        from .plugin_aot import check_latent_aot

        check_latent_aot(meta)
    for cc in cfg.compute_capabilities or []:
        if cc not in RTX_TARGETS:
            raise UserError(f"unknown compute capability '{cc}'; TensorRT-RTX targets: {', '.join(RTX_TARGETS)}")
    if cfg.compute_capabilities and cfg.backend != "tensorrt-rtx":
        raise UserError("--compute-capabilities applies to --backend tensorrt-rtx only (TensorRT builds for its GPU)")


def _tensor_io(network) -> dict[str, list[dict[str, Any]]]:
    def row(t):
        return {"name": t.name, "dtype": t.dtype.name, "shape": [int(d) for d in t.shape]}

    return {"inputs": [row(network.get_input(i)) for i in range(network.num_inputs)],
            "outputs": [row(network.get_output(i)) for i in range(network.num_outputs)]}


def _parse(trt, logger, onnx_path: Path):
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise PassFailed(f"the TensorRT ONNX parser rejected {onnx_path}: {errors}")
    return builder, network, parser


def _builder_config(trt, builder, cfg: EngineConfig, profiles: list[Profile]):
    bc = builder.create_builder_config()
    if hasattr(trt, "PreviewFeature") and hasattr(trt.PreviewFeature, "ALIASED_PLUGIN_IO_10_03"):
        bc.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
    if cfg.workspace_mb:
        bc.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mb << 20)
    targets: list[str] = []
    if cfg.backend == "tensorrt-rtx":
        targets = cfg.compute_capabilities or DEFAULT_RTX_TARGETS
        bc.num_compute_capabilities = len(targets)
        for i, cc in enumerate(targets):
            bc.set_compute_capability(getattr(trt.ComputeCapability, cc), i)
    for p in profiles:
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            prof.set_shape(name, lo, opt, hi)
        bc.add_optimization_profile(prof)
    return bc, targets


def _current_gpu() -> list[str]:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return [f"SM{major}{minor}"]
    except ImportError:
        pass
    return []


def _register_plugin(trt, cfg: EngineConfig, meta: dict[str, Any]) -> None:
    if cfg.plugin == "aot" and op_type(meta) == "KVLatentAttention":
        from .plugin_aot import register_latent_aot

        register_latent_aot(trt, meta)
    elif cfg.plugin == "aot":
        from .plugin_aot import register_aot

        register_aot(trt, meta)
    else:
        from .plugin import register

        register(trt)


def check_engine_fits(onnx_bytes: int) -> None:
    """UserError before TensorRT is imported when the build cannot fit this machine's RAM."""
    from ..onnx import footprint

    footprint.check_engine_fits(onnx_bytes)


def export_engine(onnx_dir, cfg: EngineConfig, out, *, overwrite: bool = False, progress: bool = True) -> PassResult:
    """Build `out/model.plan` from `onnx_dir` (a `kvconvert export onnx` folder). Writes kvconvert.json with the
    TensorRT version, compute capabilities, profiles and the engine's I/O (names, dtypes, shapes, aliases)."""
    onnx_dir = Path(onnx_dir)
    meta = read_onnx_metadata(onnx_dir)
    profiles = engine_profiles(meta, cfg)
    _check_config(cfg, meta)
    standard = attention_mode(meta) == "standard"
    if standard:
        check_standard_graph(cfg, meta)
    check_engine_fits(sum(f.stat().st_size for f in onnx_dir.iterdir() if f.is_file() and f.suffix != ".json"))
    trt = import_backend(cfg.backend)
    if not standard:
        _register_plugin(trt, cfg, meta)
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder, network, _parser = _parse(trt, logger, onnx_dir / "model.onnx")
    io = _tensor_io(network)
    layers = layer_counts(network)
    if standard:
        aliases = cache_update_aliases(trt, network, cache_aliases(meta))
        if cfg.decompose_attention:
            decompose_attention(trt, network)
        plugin = {"mode": "none", "needs_python": False}
    else:
        aliases = cache_aliases(meta)
        plugin = {"mode": cfg.plugin, "name": op_type(meta), "namespace": "kvconvert", "version": "1",
                  "needs_python": cfg.plugin == "python"}
    bc, targets = _builder_config(trt, builder, cfg, profiles)
    plan = builder.build_serialized_network(network, bc)
    if plan is None:
        raise PassFailed(f"{cfg.backend} could not build an engine from {onnx_dir / 'model.onnx'} (see the log above)")
    seconds = time.perf_counter() - t0
    parent = provenance.read(onnx_dir)
    record = provenance.new_record(parent["source"] if parent else {"spec": str(onnx_dir), "kind": "folder"}, parent)
    engine = {
        "backend": cfg.backend, "tensorrt_version": version(trt), "module": trt.__name__,
        "compute_capabilities": targets or _current_gpu(), "plan": PLAN_FILE, "plan_bytes": int(plan.nbytes),
        "attention": attention_mode(meta), "plugin": plugin, "layers": layers,
        "profiles": [p.as_dict() for p in profiles], "io": io, "aliases": aliases,
        "onnx": {"folder": str(onnx_dir.resolve()), "metadata": meta},
    }
    metrics = {"engine": {"build_seconds": round(seconds, 3), "plan_bytes": int(plan.nbytes)}}
    with atomic_output_dir(out, overwrite, inputs=(onnx_dir,)) as tmp:
        (tmp / PLAN_FILE).write_bytes(bytes(plan))
        engine["plan_sha256"] = file_sha256(tmp / PLAN_FILE)
        copy_side_files(onnx_dir, tmp)
        provenance.add_pass(record, "export_engine", cfg.model_dump(), seconds, metrics)
        record["engine"] = engine
        provenance.write(tmp, record)
    log.info("engine: %s (%d bytes, %s %s, %.2f s)", Path(out) / PLAN_FILE, plan.nbytes, cfg.backend, version(trt),
             seconds)
    return PassResult(Path(out), metrics, record)
