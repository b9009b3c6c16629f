"""Server settings, typed; from CLI flags or MUXSERVE_* environment variables."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator


class Settings(BaseModel):
    """Everything a deployment can set (``muxserve serve --help`` lists each with its default)."""

    model_repository: str = "model_repository"
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001  # 0 or negative: no gRPC
    grpc_transport: Literal["native", "grpcio"] = Field("native", description="native: muxserve's HTTP/2 transport (0.07 ms of CPU per call where grpc.aio takes 0.25); grpcio: grpc.aio's server")
    workers: int = Field(0, description="frontend processes (HTTP + gRPC each, on shared ports); 0: one per 4 cores (per 2 on CUDA), 1 to 8")
    models: list[str] = Field(default_factory=list, description="serve only these models (default: all)")
    model_control_mode: Literal["none", "explicit", "poll"] = Field("none", description="none: load at start only; explicit: load/unload requests; poll: follow the repository's folders")
    load_models: list[str] = Field(default_factory=list, description="explicit mode: the models to load at start ('*': all)")
    repository_poll_secs: float = Field(15.0, gt=0, description="poll mode: seconds between scans of the repository")
    device: str = Field("", description="override instance_group: cpu | cuda | cuda:N")
    precision: str = Field("", description="override: auto | fp32 | bf16 | fp16 (CUDA only) | int8 (x86 CPU); auto: bf16 on CPUs with bf16 units, fp16 on CUDA, int8 on other x86 CPUs with AVX2, else fp32")
    engine: str = Field("", description="override: eager | compiled | torchscript | echo")
    instances: int = Field(0, description="engine instances per model (passes run side by side); 0: config.pbtxt instance_group count, else automatic")
    threads: int = Field(0, description="intra-op threads per engine instance; 0: config.pbtxt INTRA_OP_THREAD_COUNT, else automatic")
    pass_fill_ms: float | None = Field(None, ge=0, description="longest wait of a free engine instance for the texts that fill its pass while another instance computes; 0: off; None: config.pbtxt pass_fill_microseconds, else automatic")
    cuda_graphs: bool | None = Field(None, description="eager engine on CUDA: replay CUDA graphs of the passes; None: config.pbtxt optimization.cuda.graphs, else on where the model allows")
    max_batch_tokens: int | None = Field(None, description="token budget per forward pass (mux groups x padded length); 0: fixed batches; None: config.pbtxt, else automatic")
    length_aware: bool = Field(True, description="batch texts of similar length, and fill mux groups by length when a pass takes the whole queue (less padding)")
    warmup: bool = True
    max_request_bytes: int = Field(16 * 1024 * 1024, description="HTTP bodies and gRPC messages larger than this are refused (413 / RESOURCE_EXHAUSTED)")
    max_text_chars: int = Field(100_000, description="longer texts are cut before tokenizing (they are truncated to max_seq_length anyway)")
    shadow: bool = Field(True, description="run shadow sampling where a model's config asks for it")
    log_level: str = "info"
    # -- limits (each frontend enforces its own; see docs/reliability.md)
    max_tensor_elements: int = Field(65536, description="an input tensor declaring more elements is refused before it is decoded (413)")
    max_client_batch_size: int = Field(1024, description="texts in one /v1/classify call; split into the model's max_batch_size")
    max_receiving_bytes: int = Field(256 * 1024 * 1024, ge=0, description="bytes of HTTP bodies and gRPC messages a frontend holds, from their first byte until their request is answered (a streaming call's messages while they arrive); a request that would pass it is refused (429 / RESOURCE_EXHAUSTED with Retry-After); 0: no limit")
    max_texts_in_flight: int = Field(8192, description="texts accepted and not yet answered; past it 429 / RESOURCE_EXHAUSTED with Retry-After; 0: no limit")
    max_queue_wait_s: float = Field(0.0, ge=0, description="refuse a request at once (429 / RESOURCE_EXHAUSTED with Retry-After) when the texts in flight, at the rate answers come back, would keep it waiting longer than this; 0: no bound")
    max_concurrent_rpcs: int = Field(1024, description="gRPC calls served at once; past it RESOURCE_EXHAUSTED")
    max_concurrent_streams: int = Field(256, description="HTTP/2 streams per gRPC connection")
    max_stream_inflight: int = Field(128, description="requests of one ModelStreamInfer stream served at once (the stream is read no further until one is answered)")
    idle_timeout_s: float = Field(30.0, description="close a connection idle this long (HTTP keep-alive, gRPC max_connection_idle)")
    header_timeout_s: float = Field(10.0, description="a request's head must arrive within this after its first byte (HTTP; gRPC: the connection handshake)")
    body_timeout_s: float = Field(30.0, description="a request body must arrive within this after its head (HTTP, 408)")
    write_timeout_s: float = Field(30.0, description="reset a connection whose client reads none of what it is sent for this long (HTTP and gRPC)")
    client_connection_rate: float = Field(256.0, ge=0, description="new HTTP and gRPC connections a second from one client address (IPv6: one /64), after a burst of client_connection_burst; past it a connection gets 429 (gRPC: GOAWAY) and is closed at once; 0: no limit")
    client_connection_burst: int = Field(1024, ge=1, description="new HTTP connections one client address may open at once before client_connection_rate applies")
    client_connection_block_s: float = Field(5.0, ge=0, description="an address refused more than client_connection_burst connections past its rate (over twice client_connection_rate) has its new connections dropped by the kernel for this long, on the HTTP and gRPC ports (Linux); 0: never, always 429")
    # -- security (docs/security.md)
    api_key: str = Field("", description="if set, every request but those to open_endpoints needs it: HTTP 'Authorization: Bearer KEY', gRPC 'authorization' metadata")
    open_endpoints: list[str] = Field(default_factory=lambda: ["health", "metrics"], description="endpoint groups served without the API key: health, metrics, metadata")
    tls_certfile: str = Field("", description="PEM certificate (chain): serve HTTPS and gRPC over TLS")
    tls_keyfile: str = Field("", description="PEM private key of tls_certfile")

    @field_validator("open_endpoints")
    @classmethod
    def _known_groups(cls, groups: list[str]) -> list[str]:
        from muxserve.serving.security import ENDPOINT_GROUPS

        unknown = sorted(set(groups) - set(ENDPOINT_GROUPS))
        if unknown:
            raise ValueError(f"unknown endpoint groups {unknown} (known: {', '.join(ENDPOINT_GROUPS)})")
        return groups

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if bool(self.tls_certfile) != bool(self.tls_keyfile):
            raise ValueError("TLS needs both tls_certfile and tls_keyfile")
        return self

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        env = {k.removeprefix("MUXSERVE_").lower(): v for k, v in os.environ.items() if k.startswith("MUXSERVE_")}
        known = {k: v for k, v in env.items() if k in cls.model_fields}
        for name in LIST_FIELDS & known.keys():
            known[name] = [m for m in str(known[name]).split(",") if m]
        return cls(**{**known, **{k: v for k, v in overrides.items() if v is not None}})


LIST_FIELDS = {name for name, f in Settings.model_fields.items() if f.annotation == list[str]}
