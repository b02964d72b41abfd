"""Healing under `torchrun --nproc-per-node 2` (gloo, CPU): FSDP2 and DDP give the single-process losses and
weights for the same global batch; the CLI runs unchanged under torchrun; an FSDP heal resumes exactly."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvconvert.convert.heal_distributed import Parallel, setup
from kvconvert.convert.heal_pass import HealPassConfig, heal_model
from kvconvert.errors import UserError
from kvconvert.io import provenance

TESTS = Path(__file__).parent
ROOT = TESTS.parent

SCRIPT = """
import json, os, sys, torch
from kvconvert.convert.heal_pass import HealPassConfig, heal_model
student, teacher, out, cfg = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
data = [torch.randint(3, 150, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(12)]
res = heal_model(student, HealPassConfig(teacher=teacher, **cfg), out, calib=data, progress=False)
if int(os.environ["RANK"]) == 0:
    print("LOSSES " + json.dumps(res.metrics["losses"]))
"""


def _data():
    return [torch.randint(3, 150, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(12)]


def torchrun(*args, nproc=2, timeout=300):
    """`python -m torch.distributed.run --nproc-per-node N ARGS` on the CPU (gloo); returns the finished process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def pair(tiny_mqa_pair):
    return tiny_mqa_pair


def _weights(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


@pytest.fixture(scope="module")
def latent(tiny_folder, tmp_path_factory):
    """A fit-latent student of the tiny llama (the heal is usable after any conversion)."""
    from kvconvert.convert.latent import LatentConfig, fit_latent

    out = tmp_path_factory.mktemp("lat") / "lat"
    fit_latent(tiny_folder("llama"), LatentConfig(kv_ratio=0.5, allocation="uniform", metric="none", evaluate=False),
               out, calib=_data()[:6], progress=False)
    return out


@pytest.mark.parametrize("parallel, extra, kind", [
    ("fsdp", {"hidden_weight": 0.5, "activation_checkpointing": True, "kd_chunk": 16, "max_shard_size": "100KB"},
     "gqa"),
    ("ddp", {"trainable": "all", "save_every": 2}, "gqa"),
    ("fsdp", {}, "latent"),
])
def test_two_processes_match_one(pair, latent, tmp_path, parallel, extra, kind):
    teacher, student = pair
    student = latent if kind == "latent" else student
    base = {"steps": 4, "lr": 3e-3, "batch": 4, "seqlen": 32, "evaluate": False, "device": "cpu", **extra}
    ref_cfg = {k: v for k, v in base.items() if k not in ("activation_checkpointing", "kd_chunk", "save_every")}
    ref = heal_model(student, HealPassConfig(teacher=str(teacher), parallel="none", **ref_cfg), tmp_path / "one",
                     calib=_data(), progress=False)
    script = tmp_path / "heal_script.py"
    script.write_text(SCRIPT)
    proc = torchrun(script, student, teacher, tmp_path / "two", json.dumps({**base, "parallel": parallel}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOSSES ")]
    assert len(lines) == 1  # rank 0 only
    losses = json.loads(lines[0][7:])
    assert len(losses) == 4 and losses == pytest.approx(ref.metrics["losses"], rel=1e-4)
    assert kind == "latent" or losses[-1] < losses[0]  # (4 steps of a near-lossless latent: noise)
    one, two = _weights(ref.out), _weights(tmp_path / "two")
    assert one.keys() == two.keys()
    changed = 0
    for name, a in one.items():
        torch.testing.assert_close(two[name], a, rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(a, _weights(student)[name]) if name.endswith("q_proj.weight") else 0
    assert changed == 2  # both layers' attention moved
    rec = provenance.read(tmp_path / "two")["passes"][-1]["params"]
    assert (rec["parallel"], rec["world_size"]) == (parallel, 2)
    assert not (tmp_path / "two.heal-state").exists()
    if "max_shard_size" in extra:  # streamed shard by shard
        assert len(list((tmp_path / "two").glob("model-*.safetensors"))) > 1
        assert (tmp_path / "two" / "model.safetensors.index.json").is_file()
    if kind == "latent":
        assert json.loads((tmp_path / "two" / "config.json").read_text())["model_type"] == "kvconvert_latent"


RESUME = """
import copy, os, sys, tempfile, torch
sys.path.insert(0, {tests!r})
from tiny_models import perturbed_pair as pair
from kvconvert.convert.heal import HealConfig, heal
from kvconvert.convert.heal_distributed import setup

par, _ = setup("fsdp", "cpu")
data = [torch.randint(3, 150, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(5)]
cfg = HealConfig(steps=6, lr=3e-3, batch=2, seqlen=32, save_every=2)
state = {state!r}
s, t = pair()
ref = heal(s, t, cfg, calib=data, progress=False, parallel=par)
whole = {{n: p.full_tensor() for n, p in s.named_parameters()}}
s, t = pair()
heal(s, t, cfg, calib=data, progress=False, parallel=par, state_dir=state, on_step=lambda step, loss: step == 3)
s, t = pair()
out = heal(s, t, cfg, calib=data, progress=False, parallel=par, state_dir=state, resume=True)
resumed = {{n: p.full_tensor() for n, p in s.named_parameters()}}
assert len(out["losses"]) == 6
assert all(abs(a - b) <= 1e-6 * abs(a) for a, b in zip(out["losses"], ref["losses"])), (out["losses"], ref["losses"])
for n in whole:
    torch.testing.assert_close(resumed[n], whole[n], rtol=1e-6, atol=1e-7, msg=n)
if par.rank == 0:
    print("RESUMED", len(out["losses"]))
"""


def test_fsdp_heal_resumes_to_the_same_weights(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(RESUME.format(tests=str(TESTS), state=str(tmp_path / "state")))
    proc = torchrun(script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("RESUMED 6") == 1
    saved = torch.load(tmp_path / "state" / "heal-state.pt", weights_only=True)
    assert saved["parallel"] == "fsdp" and saved["step"] == 6


def test_cli_under_torchrun(pair, tmp_path):
    """`torchrun -m kvconvert heal ...` unchanged: one summary line (rank 0), before/after evaluation, plan."""
    teacher, student = pair
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 37} and more text {i}" for i in range(400)))
    proc = torchrun("-m", "kvconvert", "heal", student, "--teacher", teacher, "--out", tmp_path / "o", "--steps", 2,
                    "--seqlen", 32, "--batch", 2, "--calib", text, "--eval-text", text, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1 and "2 steps" in proc.stdout and "perplexity" in proc.stdout
    assert proc.stderr.count("heal memory plan: ") == 1 and "2 x fsdp" in proc.stderr
    rec = json.loads((tmp_path / "o" / "kvconvert.json").read_text())
    assert rec["passes"][-1]["params"]["world_size"] == 2 and rec["metrics"]["perplexity_ratio"] > 0


def test_parallel_refusals(cli, pair, tmp_path, monkeypatch):
    teacher, student = pair
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    code, _, err = cli("heal", student, "--teacher", teacher, "--out", tmp_path / "o", "--steps", "1",
                       "--parallel", "ddp", "--no-eval")
    assert code == 2 and err.count("\n") == 1 and "torchrun" in err
    assert not (tmp_path / "o").exists()
    assert setup("auto", "cpu")[0].mode == "none"
    par = Parallel()
    par.world_size = 3
    with pytest.raises(UserError, match="multiple of 3"):
        par.check_batch(4)
    ids = torch.arange(12).reshape(6, 2)
    par.rank = 0
    rows = []
    for r in range(3):
        par.rank = r
        rows.append(par.local(ids))
    assert torch.equal(torch.cat(rows), ids)  # the ranks' rows tile the global batch
