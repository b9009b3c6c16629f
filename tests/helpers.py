"""Test helpers: tiny model repositories and the real server process on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from muxserve.model.muxbert import MuxBertConfig, MuxBertModel
from muxserve.model.weights import minilm_dir, save_model
from muxserve.packaging import default_config, package_model

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SST2_DEV = SHARED_DATA / "sst2" / "dev.tsv"


def tiny_config(num_instances: int, seed: int = 0, **overrides: object) -> MuxBertConfig:
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128, max_seq_length=64, num_instances=num_instances, seed=seed)
    return MuxBertConfig(**{**base, **overrides})


def make_tiny_repository(root: Path, models: dict[str, int], engine: str = "", **config_kwargs: object) -> Path:
    """Random tiny models (real MiniLM tokenizer) in Triton layout: {name: N}."""
    tokenizer = minilm_dir() / "tokenizer.json"
    for i, (name, n) in enumerate(models.items()):
        torch.manual_seed(i)
        model = MuxBertModel(tiny_config(n, seed=i))
        with tempfile.TemporaryDirectory() as tmp:
            save_model(model, tmp, torch.float32, tokenizer)
            cfg = default_config(name, n, model.config.num_labels, **config_kwargs)
            if engine:
                cfg.parameters["engine"].string_value = engine
            package_model(tmp, root, name, config=cfg)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(repository: Path, log_path: Path, *extra: str, grpc: bool = True, ready_timeout: float = 120) -> ServerProcess:
    http_port, grpc_port = free_port(), (free_port() if grpc else 0)
    cmd = [sys.executable, "-m", "muxserve", "serve", "--model-repository", str(repository), "--host", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(grpc_port), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(proc, http_port, grpc_port, log_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"http://{server.http_url}/v2/health/ready", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not ready after {ready_timeout}s:\n{server.log()}")
