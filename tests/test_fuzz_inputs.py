"""Randomly corrupted safetensors headers and config.json files (seeded, made here) fed to `inspect` and
`mha-to-gqa --no-eval` in-process: every case exits 0 or 2 (never 1, never a traceback), a bad input is
one `kvconvert: error:` line and writes nothing, and what a success writes is a readable checkpoint."""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest

from kvconvert.io.safetensors_check import read_header

SEED = 13
CASES = 130  # per kind (header, config)
ODD_VALUES = [None, -1, 0, 1, 3, 7, 2**40, 10**30, 2.5, -0.0, True, False, "", "x", "F32", [], [1, 2], {}, {"a": 1},
              [[1, 2], [3]], "NaN", 1e308]


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _pack(header, data: bytes, length_delta: int = 0) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", max(0, len(text) + length_delta)) + text + data


def corrupt_header(rng: random.Random, raw: bytes) -> bytes:
    """One random corruption of a safetensors file: a change in its JSON header, or raw byte damage."""
    header, data = _split(raw)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    info = header[name]
    kind = rng.randrange(14)
    if kind == 0:
        info["dtype"] = rng.choice(["F99", "", "f32", "I32", "F16", "BF16", "U8", "F64", "BOOL", 5, None, ["F32"]])
    elif kind == 1:
        shape = list(info["shape"])
        op = rng.randrange(5)
        if op == 0 and shape:
            shape.pop(rng.randrange(len(shape)))
        elif op == 1:
            shape.insert(rng.randrange(len(shape) + 1), rng.choice([1, 2, 0]))
        elif op == 2 and shape:
            shape[rng.randrange(len(shape))] = rng.choice(ODD_VALUES)
        elif op == 3:
            shape = shape[::-1]
        else:
            shape = rng.choice(ODD_VALUES)
        info["shape"] = shape
    elif kind == 2:
        start, stop = info["data_offsets"]
        info["data_offsets"] = rng.choice([[stop, start], [start + 4, stop + 4], [start, stop - 4], [start - 8, stop],
                                           [start], [start, stop, stop], [float(start), stop], ["0", stop],
                                           None, rng.choice(ODD_VALUES)])
    elif kind == 3:
        info.pop(rng.choice(["dtype", "shape", "data_offsets"]))
    elif kind == 4:
        del header[name]
    elif kind == 5:
        header[name[:-1] if rng.random() < 0.5 else name.replace("layers.0", "layers.9")] = header.pop(name)
    elif kind == 6:
        other = header[rng.choice(names)]
        info["data_offsets"] = list(other["data_offsets"])
    elif kind == 7:
        header = rng.choice([[1, 2], "header", 7, None, [header]])
    elif kind == 8:
        header["__metadata__"] = rng.choice([[1], 5, {"format": 5}, {"format": None}, "pt"])
    elif kind == 9:
        header[name] = rng.choice(ODD_VALUES)
    elif kind in (10, 11):  # raw damage inside the header text
        out = bytearray(_pack(header, data))
        for _ in range(rng.randint(1, 6)):
            out[rng.randrange(8, 8 + len(json.dumps(header)))] = rng.randrange(256)
        return bytes(out)
    elif kind == 12:  # a wrong length prefix, or a truncated / extended file
        return rng.choice([_pack(header, data, rng.choice([-9, -1, 1, 7, 2**40])),
                           _pack(header, data)[:rng.randrange(0, len(raw))],
                           _pack(header, data) + bytes(rng.randint(1, 64))])
    else:
        return rng.randbytes(rng.choice([0, 4, 8, 64, 1024]))
    return _pack(header, data)


def corrupt_config(rng: random.Random, text: str) -> bytes:
    """One random corruption of a config.json: a key removed or retyped, the model type changed, or raw damage."""
    cfg = json.loads(text)
    key = rng.choice(sorted(cfg))
    kind = rng.randrange(8)
    if kind == 0:
        del cfg[key]
    elif kind in (1, 2):
        cfg[key] = rng.choice(ODD_VALUES)
    elif kind == 3:
        key = rng.choice(["num_attention_heads", "num_key_value_heads", "hidden_size", "num_hidden_layers", "head_dim",
                          "intermediate_size", "vocab_size", "tie_word_embeddings", "rope_theta", "attention_bias"])
        cfg[key] = rng.choice(ODD_VALUES)
    elif kind == 4:
        cfg["model_type"] = rng.choice(["mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "opt", "gpt_neox",
                                        "kvconvert_latent", "mamba", "", 5, None, ["llama"]])
    elif kind == 5:
        cfg = rng.choice([[cfg], "llama", 3, None])
    elif kind == 6:
        raw = bytearray(json.dumps(cfg).encode())
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    else:
        return json.dumps(cfg).encode()[:rng.randrange(0, len(json.dumps(cfg)))]
    return json.dumps(cfg).encode()


def _check(code: int, out: str, err: str, case: str) -> None:
    assert code in (0, 2), f"{case}: exit {code}: {err}"
    assert "Traceback" not in err, case
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("kvconvert: error: "), f"{case}: {err!r}"


@pytest.mark.parametrize("what", ["header", "config"])
def test_corrupted_inputs_exit_0_or_2_and_write_nothing_when_refused(cli, tiny_folder, tmp_path, what, monkeypatch,
                                                                        capsys):
    monkeypatch.setenv("KVCONVERT_CACHE", str(tmp_path / "cache"))
    clean = tiny_folder("llama")
    capsys.readouterr()
    rng = random.Random(f"{SEED}-{what}")
    raw = (clean / "model.safetensors").read_bytes()
    config = (clean / "config.json").read_text()
    codes = {0: 0, 2: 0}
    for i in range(CASES):
        case = tmp_path / f"case{i}"
        shutil.copytree(clean, case)
        if what == "header":
            (case / "model.safetensors").write_bytes(corrupt_header(rng, raw))
        else:
            (case / "config.json").write_bytes(corrupt_config(rng, config))
        label = f"{what} case {i}"
        code, out, err = cli("inspect", case)
        _check(code, out, err, f"{label} (inspect)")
        target = tmp_path / f"out{i}"
        code, out, err = cli("mha-to-gqa", case, "--groups", "2", "--no-eval", "-q", "--out", target)
        _check(code, out, err, f"{label} (mha-to-gqa)")
        codes[code] += 1
        if code == 2:
            assert not target.exists(), label
        else:
            for f in target.glob("*.safetensors"):
                read_header(f)
            json.loads((target / "config.json").read_text())
        assert not [p for p in tmp_path.iterdir() if ".kvconvert-" in p.name], label
        shutil.rmtree(case)
        shutil.rmtree(target, ignore_errors=True)
    assert codes[2] > CASES // 3, codes  # the corruptions mostly matter...
    assert codes[0] > 0 or what == "header", codes  # ...and harmless config edits still convert
