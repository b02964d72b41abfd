import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvconvert.errors import UserError
from kvconvert.io import ShardedWriter, atomic_output_dir, copy_side_files, parse_size, resolve_source
from kvconvert.io import provenance
from tiny_models import tiny_model


def test_sharded_writer_roundtrip_loads_in_transformers(tmp_path, tiny_folder):
    src = resolve_source(tiny_folder("llama"))
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes=parse_size("40KB"))
        for name, t in src.reader().iter_tensors():
            writer.add(name, t)
        files = writer.finish()
        copy_side_files(src.path, tmp)
    assert len(files) > 1 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    a = AutoModelForCausalLM.from_pretrained(src.path).eval()
    b = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 100, (1, 8))
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert not list(tmp_path.glob(".out.kvconvert-tmp-*"))


def test_parse_size_reads_units_as_transformers_does():
    """One size string means one size in every writer: GB is 10**9 (as `save_pretrained` reads it), GiB 2**30."""
    from transformers.utils.hub import convert_file_size_to_int

    for text in ("5GB", "500MB", "40KB", "2GiB", "300MiB", "7KiB", "2gib"):
        assert parse_size(text) == convert_file_size_to_int(text), text
    assert parse_size("1GiB") == 2**30 and parse_size("1GB") == 10**9 and parse_size(123) == 123


def test_sharded_source_streams_each_shard(tiny_folder):
    src = resolve_source(tiny_folder("qwen2", max_shard_size="30KB"))
    assert len(src.weight_files) > 1
    shards = list(src.reader().iter_shards())
    assert len(shards) == len(src.weight_files)
    names = [n for _, t in shards for n in t]
    assert len(names) == len(set(names)) == len(src.reader().shapes())


def test_interrupted_write_leaves_no_target(tmp_path):
    target = tmp_path / "converted"
    with pytest.raises(RuntimeError, match="injected"):
        with atomic_output_dir(target) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("injected failure")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_leaves_no_target(tmp_path):
    target = tmp_path / "converted"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(target) as tmp:
            (tmp / "x").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_and_refuses_without_flag(tmp_path):
    target = tmp_path / "t"
    with atomic_output_dir(target) as tmp:
        (tmp / "old.txt").write_text("old")
    with pytest.raises(UserError, match="not empty"):
        with atomic_output_dir(target):
            pass
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["kvconvert.json", "new.txt"]
    assert provenance.read(target)["output"]["files"] == {"new.txt": 3}
    (target / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="did not write.*notes.txt.*--overwrite-foreign"):
        with atomic_output_dir(target, overwrite=True):
            pass
    with atomic_output_dir(target, overwrite="foreign") as tmp:
        (tmp / "newer.txt").write_text("newer")
    assert sorted(p.name for p in target.iterdir()) == ["kvconvert.json", "newer.txt"]


def test_output_inside_input_refused(tmp_path, tiny_folder):
    src = tiny_folder("llama")
    with pytest.raises(UserError, match="overlaps the input"):
        with atomic_output_dir(src / "sub", inputs=(src,)):
            pass


def test_provenance_records_source_hash_and_passes(tmp_path, tiny_folder):
    src = resolve_source(tiny_folder("llama"))
    rec = provenance.new_record(src.provenance())
    provenance.add_pass(rec, "demo", {"x": 1}, 0.5, {"perplexity": 3.0})
    provenance.write(tmp_path, rec)
    back = provenance.read(tmp_path)
    assert back["source"]["blake3"] == src.content_hash() and len(back["source"]["blake3"]) == 64
    assert back["passes"][0]["params"] == {"x": 1} and back["metrics"]["perplexity"] == 3.0
    child = provenance.new_record({"spec": "x"}, parent=back)
    assert child["passes"] == back["passes"]


def test_pickle_only_with_flag(tmp_path):
    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="--allow-pickle"):
        resolve_source(tmp_path)
    src = resolve_source(tmp_path, allow_pickle=True)
    tensors = dict(src.reader().iter_tensors())
    assert torch.equal(tensors["lm_head.weight"], model.state_dict()["lm_head.weight"])
    reader = src.reader()
    for name in ("model.layers.0.self_attn.k_proj.weight", "lm_head.weight"):
        assert torch.equal(reader.get(name), model.state_dict()[name])


def test_truncated_safetensors_is_reported(tmp_path, tiny_folder):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_folder("llama"), folder)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(UserError, match="corrupt safetensors.*truncated"):
        resolve_source(folder)


def test_hub_id_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not fetch 'nobody-xyz/no-such-model'"):
        resolve_source("nobody-xyz/no-such-model")


def test_writer_serializes_every_dtype_and_copies_slices_exactly(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from kvconvert.io.safetensors_check import read_header
    from kvconvert.io.writer import FileSlice

    src = {"a": torch.randn(3, 5, dtype=torch.bfloat16), "b": torch.arange(7, dtype=torch.int64),
           "c": torch.tensor(2.5), "d": torch.zeros(0, 4), "e": torch.randn(4, 4, dtype=torch.float16)}
    save_file(src, str(tmp_path / "src.safetensors"))
    header = read_header(tmp_path / "src.safetensors")
    import struct

    data_start = 8 + struct.unpack("<Q", (tmp_path / "src.safetensors").read_bytes()[:8])[0]
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardedWriter(out, max_shard_bytes=40)
    for name in ("a", "c", "d"):
        writer.add(name, src[name])
    for name in ("b", "e"):
        info = header[name]
        start, stop = info["data_offsets"]
        writer.add_slice(name, FileSlice(tmp_path / "src.safetensors", data_start + start, stop - start,
                                         info["dtype"], info["shape"]))
    files = writer.finish()
    assert len(files) > 1
    got = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            got.update({k: sf.get_tensor(k) for k in sf.keys()})
    assert got.keys() == src.keys()
    for k, v in src.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_output_killed_between_the_two_renames_is_restored(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    target = tmp_path / "t"
    with atomic_output_dir(target) as tmp:
        (tmp / "a.txt").write_text("a")
    trash = tmp_path / f".t.kvconvert-old-{int(dead.stdout)}-zz"
    trash.mkdir()
    target.rename(trash / "old")  # what a SIGKILL between moving the old output away and renaming the new in leaves
    with pytest.raises(UserError, match="not empty"):
        with atomic_output_dir(target):
            pass
    assert (target / "a.txt").read_text() == "a" and not trash.exists()
    assert not list(tmp_path.glob(".t.kvconvert-*"))
