"""`export_triton(src, cfg, repo)`: a Triton model repository from an engine folder (model.plan) or an ONNX
folder (model.onnx), both made by kvconvert.

repo/<name>/config.pbtxt + repo/<name>/1/model.plan     (engine source: platform tensorrt_plan, sequence batching,
                                                         past_*/present_* as implicit state on one buffer)
repo/<name>_generate/config.pbtxt + 1/model.py          (Python backend, decoupled streaming generation)
                      1/tokenizer.json [+ 1/model.onnx]  (ONNX Runtime mode)
repo/README.md                                          (tritonserver command, tritonclient example)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ...errors import UserError
from ...io import PassResult, atomic_output_dir, provenance
from .config import TritonRepoConfig
from .pbtxt import engine_config, generate_config
from .readme import readme_text

TEMPLATE = Path(__file__).parent / "templates" / "generate_model.py"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def inspect_source(src: Path) -> dict[str, Any]:
    """{"kind": "engine"|"onnx", "meta": ONNX kvconvert metadata, "engine": engine record or None, "onnx": dir}."""
    rec = provenance.read(src) or {}
    if (src / "model.plan").is_file():
        if "engine" not in rec:
            raise UserError(f"{src / 'model.plan'} has no kvconvert engine record; build it with kvconvert export engine")
        eng = rec["engine"]
        onnx_dir = Path(eng["onnx"]["folder"])
        return {"kind": "engine", "meta": eng["onnx"]["metadata"], "engine": eng,
                "onnx": onnx_dir if (onnx_dir / "model.onnx").is_file() else None}
    if (src / "model.onnx").is_file():
        from ..engine.build import read_onnx_metadata

        return {"kind": "onnx", "meta": read_onnx_metadata(src), "engine": None, "onnx": src}
    raise UserError(f"{src} holds neither model.plan (kvconvert export engine) nor model.onnx (kvconvert export onnx)")


def export_triton(src, cfg: TritonRepoConfig, repo, *, overwrite: bool = False) -> PassResult:
    src = Path(src)
    t0 = time.perf_counter()
    info = inspect_source(src)
    meta, eng = info["meta"], info["engine"]
    mode = cfg.generate_backend or ("engine" if eng else "onnxruntime")
    if mode == "engine" and eng is None:
        raise UserError("generate_backend 'engine' needs an engine folder; pass the output of kvconvert export engine")
    if mode == "onnxruntime" and info["onnx"] is None:
        raise UserError(f"the ONNX folder of {src} is gone ({eng['onnx']['folder']}); pass the ONNX folder too")
    tokenizer = next((d / "tokenizer.json" for d in (src, info["onnx"]) if d and (d / "tokenizer.json").is_file()), None)
    if tokenizer is None:
        raise UserError(f"{src} has no tokenizer.json (a fast tokenizer is needed by the generation model)")
    gen_name = f"{cfg.name}_generate"
    params = {"kvconvert": json.dumps({k: meta[k] for k in ("num_layers", "max_context", "vocab_size", "eos_token_id",
                                                            "bos_token_id", "dtype", "logits", "inputs", "outputs")
                                            if k in meta}),
              "mode": mode, "engine_model": cfg.name, **cfg.generate_parameters()}
    parent = provenance.read(src)
    record = provenance.new_record(parent["source"] if parent else {"spec": str(src), "kind": "folder"}, parent)
    models = {}
    with atomic_output_dir(repo, overwrite, inputs=(src,)) as tmp:
        if eng is not None:
            (tmp / cfg.name / "1").mkdir(parents=True)
            max_batch = max(p["shapes"]["input_ids"][2][0] for p in eng["profiles"])
            text = engine_config(cfg.name, eng["io"], max_batch, cfg.instances, cfg.max_sequence_idle_us)
            (tmp / cfg.name / "config.pbtxt").write_text(text)
            _link_or_copy(src / eng["plan"], tmp / cfg.name / "1" / "model.plan")
            shutil.copy2(src / provenance.FILENAME, tmp / cfg.name / "1" / provenance.FILENAME)
            models[cfg.name] = {"platform": "tensorrt_plan", "max_batch_size": max_batch}
        version_dir = tmp / gen_name / "1"
        version_dir.mkdir(parents=True)
        (tmp / gen_name / "config.pbtxt").write_text(
            generate_config(gen_name, params, cfg.instances, gpu=mode == "engine"))
        shutil.copy2(TEMPLATE, version_dir / "model.py")
        shutil.copy2(tokenizer, version_dir / "tokenizer.json")
        if mode == "onnxruntime":
            for f in info["onnx"].iterdir():
                if f.name == "model.onnx" or f.name.startswith("model.onnx."):
                    _link_or_copy(f, version_dir / f.name)
        models[gen_name] = {"backend": "python", "mode": mode}
        (tmp / "README.md").write_text(readme_text(cfg, models, eng))
        seconds = time.perf_counter() - t0
        provenance.add_pass(record, "export_triton", cfg.model_dump(), seconds, {"triton": {"models": models}})
        provenance.write(tmp, record)
    return PassResult(Path(repo), {"triton": {"models": models}}, record)
