"""``muxserve export``: TorchScript ``model.pt`` of a model, checked against eager."""

from __future__ import annotations

import argparse
import json

NAME = "export"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="trace a model to TorchScript (model.pt in its version folder) and check it against eager")
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--model", required=True, help="model name in the repository, or a model folder")
    p.add_argument("--version", type=int, help="version (default: highest)")
    p.add_argument("--out", help="output file (default: <version folder>/model.pt)")
    p.add_argument("--seq-len", type=int, default=64, help="sequence length of the example used for tracing")
    p.add_argument("--device", default="cpu", help="device to trace and check on (cpu, cuda)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights and compute dtype of the exported module")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference on logits allowed (exit 1 above)")
    p.add_argument("--threads", type=int, default=0)


def run(a: argparse.Namespace) -> int:
    import torch

    from muxserve.model.export import export_torchscript
    from muxserve.serving.repository import resolve_model_dir

    if a.threads:
        torch.set_num_threads(a.threads)
    directory = resolve_model_dir(a.model_repository, a.model, a.version)
    result = export_torchscript(directory, a.out, seq_len=a.seq_len, device=a.device, tolerance=a.tolerance, dtype=getattr(torch, a.dtype))
    print(json.dumps({"model": a.model, **{k: v for k, v in result.items() if k != "checks"}, "checks": result["checks"]}))
    return 0 if result["ok"] else 1
