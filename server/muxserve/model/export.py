"""TorchScript export of a saved MUX-BERT model (``model.pt`` for the engines and Triton's
pytorch backend).

The module is traced (``torch.jit.trace``) over ``forward(input_ids, attention_mask)``, both
int64 ``[T, L]``, returning logits ``[T, C]`` (``[T, L, C]`` for token classification). Shapes
stay dynamic: tracing records the sizes as graph values, so the traced module runs on any ``T``
and any ``L`` up to ``max_position_embeddings``. ``T`` need not be a multiple of N: the short
last group is filled before the traced model by a scripted function with the model's own policy
(``copy`` or ``pad``), because a trace would freeze the model's Python branch on ``T % N``.

The model's ``muxbert.json`` travels inside the archive as the extra file ``muxbert.json``
(``torch.jit.load(path, _extra_files={"muxbert.json": ""})``).

TorchScript is deprecated in recent torch releases (they warn on trace/script/save/load; the
warnings are silenced here) but it is what Triton's pytorch backend and libtorch load.
"""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from muxserve.model.muxbert import MuxBertModel, fill_short_group
from muxserve.model.weights import CONFIG_FILE, load_model

EXPORT_FILE = "model.pt"
TOLERANCE = 1e-4


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """Silence TorchScript's deprecation warnings and the expected tracer warnings."""
    with warnings.catch_warnings():
        # the trace freezes the model's own (never taken) short-group branch: expected, see above
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated.*")
        yield


@functools.cache
def scripted_fill_short_group() -> torch.jit.ScriptFunction:
    """``fill_short_group`` compiled by TorchScript: a trace keeps its branches."""
    with _quiet_jit():
        return torch.jit.script(fill_short_group)


class TraceableMuxBert(nn.Module):
    """The model behind a scripted short-group fill, so that any ``T`` traces correctly."""

    def __init__(self, model: MuxBertModel) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        self.n = cfg.num_instances
        self.copy = cfg.short_group_policy == "copy"
        self.cls_id, self.sep_id, self.pad_id = cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id
        self.fill = scripted_fill_short_group()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[0]
        ids, mask = self.fill(input_ids, attention_mask, self.n, self.copy, self.cls_id, self.sep_id, self.pad_id)
        return self.model(ids, mask)[:t]


def example_inputs(model: MuxBertModel, texts: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random right-padded [CLS] ... [SEP] rows of random lengths (at least one of full length)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    low = min(1000, cfg.vocab_size // 2)
    ids = torch.full((texts, seq_len), cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros((texts, seq_len), dtype=torch.long)
    lengths = torch.randint(min(3, seq_len), seq_len + 1, (texts,), generator=gen)
    lengths[0] = seq_len
    for i, n in enumerate(lengths.tolist()):
        ids[i, :n] = torch.randint(low, cfg.vocab_size, (n,), generator=gen)
        ids[i, 0] = cfg.cls_token_id
        if n > 1:
            ids[i, n - 1] = cfg.sep_token_id
        mask[i, :n] = 1
    return ids, mask


def trace(model: MuxBertModel, seq_len: int = 64, groups: int = 2) -> torch.jit.ScriptModule:
    """Trace ``model`` (eval mode) on ``groups`` full mux groups of length ``seq_len``."""
    model.eval()
    ids, mask = example_inputs(model, groups * model.config.num_instances, seq_len)
    device = next(model.parameters()).device
    with torch.no_grad(), _quiet_jit():
        return torch.jit.trace(TraceableMuxBert(model), (ids.to(device), mask.to(device)), check_trace=False)


def check_shapes(model: MuxBertModel, seq_len: int) -> list[tuple[int, int]]:
    """(texts, length) pairs to compare traced and eager on: the traced shape, a batch that is not
    a multiple of N, a single text, and other lengths."""
    n = model.config.num_instances
    longest = min(model.config.max_position_embeddings, 2 * seq_len)
    shapes = [(2 * n, seq_len), (3 * n + 1 if n > 1 else 3, max(4, seq_len // 2 + 3)), (1, max(4, seq_len // 4)), (n + max(1, n // 2), longest)]
    return list(dict.fromkeys(shapes))


@torch.no_grad()
def compare(traced: torch.jit.ScriptModule, model: MuxBertModel, shapes: list[tuple[int, int]]) -> list[dict]:
    device = next(model.parameters()).device
    results = []
    for i, (texts, length) in enumerate(shapes):
        ids, mask = (x.to(device) for x in example_inputs(model, texts, length, seed=100 + i))
        eager, got = model(ids, mask), traced(ids, mask)
        if got.shape != eager.shape:
            raise RuntimeError(f"traced output shape {tuple(got.shape)} != eager {tuple(eager.shape)} for input [{texts}, {length}]")
        results.append({"texts": texts, "seq_len": length, "max_abs_diff": float((got.float() - eager.float()).abs().max())})
    return results


def export_torchscript(model_dir: str | Path, out_path: str | Path | None = None, seq_len: int = 64, device: str = "cpu", tolerance: float = TOLERANCE, dtype: torch.dtype = torch.float32) -> dict:
    """Trace the model in ``model_dir`` (fp32 unless ``dtype``), save it to ``out_path`` (default
    ``model_dir/model.pt``), reload the file and compare it with eager (same dtype) on several batch
    sizes and lengths. Returns a summary with ``max_abs_diff`` and ``ok`` (<= tolerance)."""
    model_dir = Path(model_dir)
    out_path = Path(out_path) if out_path is not None else model_dir / EXPORT_FILE
    model = load_model(model_dir, device=device, dtype=dtype)
    seq_len = max(4, min(seq_len, model.config.max_position_embeddings))
    traced = trace(model, seq_len)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    extra = {CONFIG_FILE: (model_dir / CONFIG_FILE).read_text()}
    with _quiet_jit():
        torch.jit.save(traced, str(out_path), _extra_files=extra)
        reloaded = torch.jit.load(str(out_path), map_location=device)
    checks = compare(reloaded, model, check_shapes(model, seq_len))
    worst = max(c["max_abs_diff"] for c in checks)
    return {
        "model_dir": str(model_dir), "out": str(out_path), "num_instances": model.config.num_instances,
        "task": model.config.task, "trace_seq_len": seq_len, "device": device, "dtype": str(dtype).removeprefix("torch."), "max_abs_diff": worst,
        "tolerance": tolerance, "ok": worst <= tolerance, "checks": checks, "bytes": out_path.stat().st_size,
    }


def load_exported(path: str | Path, device: str = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """Load an exported ``model.pt`` and the ``muxbert.json`` config stored inside it."""
    extra = {CONFIG_FILE: ""}
    with _quiet_jit():
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    return module.eval(), json.loads(extra[CONFIG_FILE] or "{}")
