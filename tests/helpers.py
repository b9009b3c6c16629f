"""Test helpers: tiny model repositories and the real server process on loopback."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from muxserve.launch import ServerHandle, free_port  # noqa: F401  (re-exported for the tests)
from muxserve.launch import start_server as launch_server
from muxserve.model.muxbert import MuxBertConfig, MuxBertModel
from muxserve.model.packaging import default_config, package_model
from muxserve.model.weights import minilm_dir, save_model

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SST2_DEV = SHARED_DATA / "sst2" / "dev.tsv"


def tiny_config(num_instances: int, seed: int = 0, **overrides: object) -> MuxBertConfig:
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128, max_seq_length=64, num_instances=num_instances, seed=seed)
    return MuxBertConfig(**{**base, **overrides})


def make_tiny_repository(root: Path, models: dict[str, int], engine: str = "", **config_kwargs: object) -> Path:
    """Random tiny models (real MiniLM tokenizer) in Triton layout: {name: N}, served in fp32:
    the tests compare answers across passes exactly, and int8 (what ``auto`` serves on an AVX2
    CPU without bf16 units) scales each pass's activations by that pass's own range."""
    tokenizer = minilm_dir() / "tokenizer.json"
    for i, (name, n) in enumerate(models.items()):
        torch.manual_seed(i)
        model = MuxBertModel(tiny_config(n, seed=i))
        with tempfile.TemporaryDirectory() as tmp:
            save_model(model, tmp, torch.float32, tokenizer)
            cfg = default_config(name, n, model.config.num_labels, **config_kwargs)
            if engine:
                cfg.parameters["engine"].string_value = engine
            cfg.parameters["precision"].string_value = "fp32"
            package_model(tmp, root, name, config=cfg)
    return root


ServerProcess = ServerHandle


def start_server(repository: Path, log_path: Path, *extra: str, grpc: bool = True, ready_timeout: float = 120, **launch: object) -> ServerProcess:
    """The real ``muxserve serve`` on loopback (shadow sampling as configured), once ready
    (``launch``: ``tls_ca``, ``api_key`` of ``muxserve.launch.start_server``)."""
    return launch_server(repository, (), log_path, extra=extra, grpc=grpc, ready_timeout=ready_timeout, shadow=True, **launch)
