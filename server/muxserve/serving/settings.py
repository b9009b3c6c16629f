"""Server settings, typed; from CLI flags or MUXSERVE_* environment variables."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, Field


class Settings(BaseModel):
    model_repository: str = "model_repository"
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001  # 0 or negative: no gRPC
    models: list[str] = Field(default_factory=list, description="serve only these models (default: all)")
    model_control_mode: Literal["none", "explicit", "poll"] = Field("none", description="none: load at start only; explicit: load/unload requests; poll: follow the repository's folders")
    load_models: list[str] = Field(default_factory=list, description="explicit mode: the models to load at start ('*': all)")
    repository_poll_secs: float = Field(15.0, gt=0, description="poll mode: seconds between scans of the repository")
    device: str = Field("", description="override instance_group: cpu | cuda | cuda:N")
    precision: str = Field("", description="override: auto | fp32 | bf16 | fp16 (CUDA only); auto: bf16 on CPUs with bf16 units, fp16 on CUDA, else fp32")
    engine: str = Field("", description="override: eager | torchscript")
    threads: int = Field(0, description="intra-op threads per engine instance; 0: config.pbtxt, else every core split over instances")
    max_batch_tokens: int | None = Field(None, description="token budget per forward pass (mux groups x padded length); 0: fixed batches; None: config.pbtxt, else automatic")
    length_aware: bool = Field(True, description="group texts of similar length (less padding)")
    warmup: bool = True
    max_request_bytes: int = Field(16 * 1024 * 1024, description="HTTP bodies larger than this get 413")
    max_text_chars: int = Field(100_000, description="longer texts are cut before tokenizing (they are truncated to max_seq_length anyway)")
    shadow: bool = Field(True, description="run shadow sampling where a model's config asks for it")
    log_level: str = "info"

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        env = {k.removeprefix("MUXSERVE_").lower(): v for k, v in os.environ.items() if k.startswith("MUXSERVE_")}
        known = {k: v for k, v in env.items() if k in cls.model_fields}
        for listed in ("models", "load_models"):
            if listed in known:
                known[listed] = [m for m in str(known[listed]).split(",") if m]
        return cls(**{**known, **{k: v for k, v in overrides.items() if v is not None}})
