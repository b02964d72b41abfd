"""Start the CPU Triton Inference Server shipped in the `nvidia-pytriton` wheel on a repository (tests, demos).

That wheel (installed in its own environment with numpy < 2 by `scripts/install.sh dev`: `.venv-tritonserver`,
or any Python named by $KVCONVERT_TRITONSERVER_PYTHON) holds `pytriton/tritonserver/bin/tritonserver` 2.51 and
the Python backend; the backend stub for the environment's Python version is put beside `libtriton_python.so`
in a private backend folder. The server listens on 127.0.0.1 only (HTTP, gRPC and the Prometheus metrics
endpoint) and is stopped by its PID.

    python -m kvconvert.export.triton.server --repo DIR [--http-port 8000 --grpc-port 8001 --metrics-port 8002]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from ...errors import UserError

ENV_VAR = "KVCONVERT_TRITONSERVER_PYTHON"
DEFAULT_VENV = Path(__file__).resolve().parents[3] / ".venv-tritonserver"
_PROBE = ("import json, os, sys, sysconfig, pytriton; print(json.dumps({'pytriton': os.path.dirname(pytriton.__file__), "
          "'libdir': sysconfig.get_config_var('LIBDIR'), 'version': '%d.%d' % sys.version_info[:2], "
          "'purelib': sysconfig.get_paths()['purelib'], 'home': os.path.dirname(os.path.realpath(sys._base_executable)), 'bin': os.path.dirname(sys.executable)}))")


def configured_server_python() -> Path:
    """The interpreter of the tritonserver environment ($KVCONVERT_TRITONSERVER_PYTHON or .venv-tritonserver)."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_VENV / "bin" / "python")


def server_python() -> Path:
    py = configured_server_python()
    if not py.exists():
        raise UserError(f"no tritonserver environment at {py}; run `bash scripts/install.sh dev` (it creates "
                        f".venv-tritonserver with nvidia-pytriton and numpy<2) or set {ENV_VAR}")
    return py


def locate(python: Path | None = None) -> dict[str, str]:
    """Paths of the tritonserver binary and the Python backend pieces in `python`'s environment."""
    python = python or server_python()
    res = subprocess.run([str(python), "-c", _PROBE], check=False, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise UserError(f"{python} cannot import pytriton (pip install nvidia-pytriton 'numpy<2' there): "
                        f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
    info = json.loads(res.stdout)
    root = Path(info["pytriton"]) / "tritonserver"
    info["binary"] = str(root / "bin" / "tritonserver")
    info["backend"] = str(root / "backends" / "python")
    info["stub"] = str(root / "python_backend_stubs" / info["version"] / "triton_python_backend_stub")
    info["libs"] = str(Path(info["pytriton"]).parent / "nvidia_pytriton.libs")
    if not Path(info["stub"]).is_file():
        raise UserError(f"nvidia-pytriton has no Python backend stub for Python {info['version']}")
    return info


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics_flags(port: int) -> list[str]:
    """tritonserver flags for the Prometheus endpoint on loopback (no GPU metrics: a CPU server)."""
    return ["--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
            "--metrics-address=127.0.0.1", f"--metrics-port={port}"]


class TritonServer:
    """`with TritonServer(repo) as server:` -> server.http_url / server.grpc_url (127.0.0.1, free ports)."""

    def __init__(self, repo: str | Path, python: Path | None = None, http_port: int | None = None,
                 grpc_port: int | None = None, log_path: Path | None = None, extra_env: dict | None = None,
                 metrics_port: int | None = None):
        self.repo = Path(repo).resolve()
        self.info = locate(python)
        self.http_port, self.grpc_port = http_port or free_port(), grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.http_url, self.grpc_url = f"127.0.0.1:{self.http_port}", f"127.0.0.1:{self.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.log_path = log_path
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen | None = None
        self._tmp: Path | None = None

    def _backend_dir(self) -> Path:
        self._tmp = Path(tempfile.mkdtemp(prefix="kvconvert-tritonserver-"))
        py = self._tmp / "python"
        py.mkdir()
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            (py / name).symlink_to(Path(self.info["backend"]) / name)
        shutil.copy2(self.info["stub"], py / "triton_python_backend_stub")
        return self._tmp

    def start(self, timeout: float = 240.0) -> TritonServer:
        backends = self._backend_dir()
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [self.info["libs"], self.info["libdir"],
                                                               env.get("LD_LIBRARY_PATH")]))
        # the stub's embedded Python ignores PYTHONPATH and finds its prefix through `python3` on PATH:
        # the server environment's bin first makes its site-packages (numpy < 2, onnxruntime, tokenizers) the ones
        env["PATH"] = os.pathsep.join([self.info["bin"], env.get("PATH", "")])
        env.update(self.extra_env)
        cmd = [self.info["binary"], f"--model-repository={self.repo}", f"--backend-directory={backends}",
               "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", f"--http-port={self.http_port}",
               f"--grpc-port={self.grpc_port}", *metrics_flags(self.metrics_port), "--exit-timeout-secs=5"]
        self.log_path = self.log_path or backends / "server.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}: {self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {timeout:.0f} s: {self.log_tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        """The Prometheus text of the metrics endpoint (Triton's own and the generation model's)."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            return r.read().decode()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        """The server's error lines (E...) and the end of its log."""
        try:
            text = Path(self.log_path).read_text()
        except OSError:
            return ""
        errors = [line for line in text.splitlines() if line.startswith("E") or "rror" in line]
        return "\n".join(errors)[-chars:] + "\n...\n" + text[-1000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self.proc is not None:
            self._log.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> TritonServer:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvconvert.export.triton.server", description=__doc__.split("\n")[0])
    p.add_argument("--repo", required=True)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    args = p.parse_args(argv)
    server = TritonServer(args.repo, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port)
    server.start()
    print(f"tritonserver ready: http {server.http_url}, grpc {server.grpc_url}, metrics {server.metrics_url} "
          f"(pid {server.proc.pid}); Ctrl-C stops")
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
