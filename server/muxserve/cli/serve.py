"""``muxserve serve``: serve a model repository over HTTP and gRPC (KServe v2)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from muxserve.serving.settings import Settings

NAME = "serve"
# settings that are flags of their own name (--max-texts-in-flight ...), typed and described by
# Settings itself; each can also come from MUXSERVE_<NAME> (docs/reliability.md, docs/security.md)
SETTING_FLAGS = (
    "max_tensor_elements", "max_client_batch_size", "max_receiving_bytes", "max_texts_in_flight", "max_queue_wait_s", "max_concurrent_rpcs", "max_concurrent_streams", "max_stream_inflight",
    "idle_timeout_s", "header_timeout_s", "body_timeout_s", "write_timeout_s", "client_connection_rate", "client_connection_burst", "client_connection_block_s", "api_key", "open_endpoints", "tls_certfile", "tls_keyfile",
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="serve a model repository over HTTP (8000) and gRPC (8001)")
    p.add_argument("--model-repository", default=None, help="default: ./model_repository")
    p.add_argument("--host", default=None, help="default: 0.0.0.0")
    p.add_argument("--http-port", type=int, default=None, help="default: 8000")
    p.add_argument("--grpc-port", type=int, default=None, help="default: 8001; 0 disables gRPC")
    p.add_argument("--grpc-transport", default=None, choices=["native", "grpcio"], help="native (default): muxserve's own HTTP/2 transport, 0.07 ms of CPU per call where grpc.aio takes 0.25; grpcio: grpc.aio's server")
    p.add_argument("--workers", type=int, default=None, help="frontend processes serving HTTP and gRPC (default: one per 4 cores, one per 2 where the models run on a GPU: --device cuda or instance_group KIND_GPU; 1 to 8)")
    p.add_argument("--models", default=None, help="comma-separated subset of the repository to serve")
    p.add_argument("--model-control-mode", default=None, choices=["none", "explicit", "poll"], help="none (default): load at start; explicit: POST /v2/repository/models/NAME/load|unload; poll: follow the repository's folders")
    p.add_argument("--load-model", action="append", default=None, metavar="NAME", help="explicit mode: load NAME at start (repeatable; '*': all)")
    p.add_argument("--repository-poll-secs", type=float, default=None, help="poll mode: seconds between scans (default 15)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (overrides instance_group)")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16", "int8"], help="default: config.pbtxt, else auto: bf16 on CPUs with bf16 units (AMX, AVX512-BF16), fp16 on CUDA, int8 (dynamic, the encoder's projections) on other x86 CPUs with AVX2, else fp32")
    p.add_argument("--engine", default=None, choices=["eager", "compiled", "torchscript", "echo"], help="eager (default), compiled (torch.compile: fused kernels, a slower start; needs a C++ compiler), torchscript (an exported model.pt), echo (no model: the serving stack alone)")
    p.add_argument("--instances", type=int, default=None, help="engine instances per model, running passes side by side (default: config.pbtxt instance_group count, else automatic: on a CPU one single-thread instance per core, up to 4)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per engine instance (default: config.pbtxt INTRA_OP_THREAD_COUNT, else automatic: the cores split over the instances)")
    p.add_argument("--pass-fill-ms", type=float, default=None, help="longest wait of a free engine instance for the texts that fill its pass while another instance computes; 0: off (default: config.pbtxt pass_fill_microseconds, else 10)")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="token budget of a forward pass, mux groups x padded length; 0: fixed batches of the preferred size (default: config.pbtxt max_batch_tokens, else automatic)")
    p.add_argument("--cuda-graphs", default=None, action=argparse.BooleanOptionalAction, help="eager engine on CUDA: replay CUDA graphs of the passes, one per bucket of groups and length (default: config.pbtxt optimization.cuda.graphs, else on where the model allows)")
    p.add_argument("--no-length-aware", action="store_true", help="batch, and fill mux groups, in arrival order")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--no-shadow", action="store_true", help="disable shadow sampling")
    p.add_argument("--max-request-bytes", type=int, default=None)
    p.add_argument("--log-level", default=None)
    from muxserve.serving.settings import LIST_FIELDS, Settings

    for name in SETTING_FLAGS:
        field = Settings.model_fields[name]
        default = field.get_default(call_default_factory=True)
        shown = ",".join(default) if name in LIST_FIELDS else default
        kind = str if name in LIST_FIELDS else field.annotation
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=f"{field.description} (default: {shown!r})")


def settings_from_args(a: argparse.Namespace) -> Settings:
    """Flags over MUXSERVE_* environment variables over the defaults."""
    from muxserve.serving.settings import LIST_FIELDS, Settings

    flags = {name: getattr(a, name) for name in SETTING_FLAGS}
    for name in LIST_FIELDS & flags.keys():
        if flags[name] is not None:
            flags[name] = [v for v in flags[name].split(",") if v]

    return Settings.from_env(
        model_repository=a.model_repository, host=a.host, http_port=a.http_port, grpc_port=a.grpc_port, grpc_transport=a.grpc_transport, workers=a.workers,
        models=[m for m in a.models.split(",") if m] if a.models else None, model_control_mode=a.model_control_mode,
        load_models=a.load_model, repository_poll_secs=a.repository_poll_secs, device=a.device, precision=a.precision,
        engine=a.engine, instances=a.instances, threads=a.threads, pass_fill_ms=a.pass_fill_ms, max_batch_tokens=a.max_batch_tokens, cuda_graphs=a.cuda_graphs, length_aware=False if a.no_length_aware else None,
        warmup=False if a.no_warmup else None, shadow=False if a.no_shadow else None,
        max_request_bytes=a.max_request_bytes, log_level=a.log_level, **flags,
    )


def run(a: argparse.Namespace) -> int:
    from muxserve.serving.server import serve

    return serve(settings_from_args(a))
