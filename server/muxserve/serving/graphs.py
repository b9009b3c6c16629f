"""CUDA graphs of the forward pass: one per bucket of (mux groups, padded length), replayed.

On a GPU a pass of a few hundred short texts is bound by launching its kernels: the eager
``predict`` of sst2-mux5 is about 370 operators, each a few microseconds of CPU in the engine
process, while the device finishes their work sooner. A CUDA graph replays all of a pass's
kernels in one launch. Graphs need fixed shapes and fixed memory, so every pass is padded up
to a bucket: its groups to the next power of two (at most the scheduler's cap), its length to
the next of ``GRAPH_LENGTHS``; the rows it adds are whole groups of empty texts ([CLS][SEP]),
whose outputs are dropped. The graphed pass is the model's padded ``forward`` (the packed
``predict`` has data-dependent shapes), which computes the same logits wherever a text's result
does not depend on how far its batch was padded: every plain model, and mux models that mask
their groups' padding (``mask_group_padding``, the bundled ones). Others stay eager.

``GraphedForward(..., capture=False)`` runs the same buckets without graphs (any device): the
tests check its padding and filler logic on a CPU.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from muxserve.model.muxbert import MuxBertModel

log = logging.getLogger("muxserve")

GRAPH_LENGTHS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
DEFAULT_MAX_GROUPS = 64  # where the caller does not say how many texts a pass may hold
# one capture at a time in this process: a capture must not see another thread's allocations
_capture_lock = threading.Lock()


def graphs_supported(model: MuxBertModel) -> bool:
    """Whether padding a pass further leaves every text's logits as they were."""
    cfg = model.config
    return cfg.task == "sequence_classification" and (not cfg.is_mux or cfg.mask_group_padding)


def group_buckets(max_groups: int) -> list[int]:
    """Powers of two below ``max_groups``, then ``max_groups`` itself."""
    out, g = [], 1
    while g < max_groups:
        out.append(g)
        g *= 2
    return [*out, max_groups]


def length_buckets(max_length: int) -> list[int]:
    return [n for n in GRAPH_LENGTHS if n < max_length] + [max_length]


@dataclass
class _Bucket:
    ids: torch.Tensor  # [groups * N, length], the graph's input
    mask: torch.Tensor
    out: torch.Tensor | None = None  # [groups * N, C], the graph's output
    graph: torch.cuda.CUDAGraph | None = None


class GraphedForward:
    """A ``Forward`` (ids, mask on the model's device -> logits) that replays a captured graph
    of the bucket holding the pass, or runs ``predict`` eagerly where none does (a pass longer
    or larger than the biggest bucket)."""

    def __init__(self, model: MuxBertModel, max_texts: int = 0, capture: bool = True) -> None:
        cfg = model.config
        self.model = model
        self.n = cfg.num_instances
        device = next(model.parameters()).device
        max_groups = -(-max_texts // self.n) if max_texts > 0 else DEFAULT_MAX_GROUPS
        self.groups = group_buckets(max_groups)
        self.lengths = length_buckets(cfg.max_seq_length)
        # an empty text fills the rows a bucket adds: [CLS][SEP], then padding
        self._fill_ids = torch.full((1, self.lengths[-1]), cfg.pad_token_id, dtype=torch.long, device=device)
        self._fill_ids[0, 0], self._fill_ids[0, 1] = cfg.cls_token_id, cfg.sep_token_id
        self._fill_mask = torch.zeros_like(self._fill_ids)
        self._fill_mask[0, :2] = 1
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        for groups in self.groups:
            for length in self.lengths:
                rows = groups * self.n
                self.buckets[groups, length] = _Bucket(self._fill_ids[:, :length].repeat(rows, 1), self._fill_mask[:, :length].repeat(rows, 1))
        if capture:
            self._capture()

    def _capture(self) -> None:
        """One graph per bucket, the largest first, all in one memory pool (a smaller pass
        reuses the largest's memory: passes never overlap)."""
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        with _capture_lock, torch.inference_mode():
            for key in sorted(self.buckets, key=lambda k: k[0] * self.n * k[1], reverse=True):
                bucket = self.buckets[key]
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up outside the graph: lazy inits, workspaces
                    self.model.forward(bucket.ids, bucket.mask)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    bucket.out = self.model.forward(bucket.ids, bucket.mask)
                bucket.graph = graph
            torch.cuda.synchronize()

    def bucket_for(self, texts: int, length: int) -> tuple[int, int] | None:
        groups = -(-texts // self.n)
        g = next((b for b in self.groups if b >= groups), None)
        n = next((b for b in self.lengths if b >= length), None)
        return None if g is None or n is None else (g, n)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        t, length = input_ids.shape
        key = self.bucket_for(t, length)
        if key is None:
            return self.model.predict(input_ids, attention_mask)
        # the model's own filling of a short last group (copies of its texts, or empty ones)
        input_ids, attention_mask = self.model.fill_short_group(input_ids, attention_mask)
        rows = input_ids.shape[0]
        bucket = self.buckets[key]
        # what the last pass of this bucket left: empty texts in every row past this pass's,
        # padding past this pass's length
        width = bucket.ids.shape[1]
        bucket.ids[:rows, length:] = self.model.config.pad_token_id
        bucket.mask[:rows, length:] = 0
        bucket.ids[:rows, :length] = input_ids
        bucket.mask[:rows, :length] = attention_mask
        bucket.ids[rows:] = self._fill_ids[:, :width]
        bucket.mask[rows:] = self._fill_mask[:, :width]
        if bucket.graph is None:  # capture=False: the same padded pass, run eagerly
            with torch.inference_mode():
                return self.model.forward(bucket.ids, bucket.mask)[:t]
        bucket.graph.replay()
        return bucket.out[:t]  # type: ignore[index]


def graphed_forward(model: MuxBertModel, max_texts: int = 0) -> GraphedForward | None:
    """``GraphedForward`` of a CUDA model, or None where the model cannot be graphed or the
    capture fails (the engine then runs ``predict`` eagerly; the log says why)."""
    if not graphs_supported(model):
        log.info("CUDA graphs off: this model's logits depend on its batch's padding (mask_group_padding false)")
        return None
    try:
        return GraphedForward(model, max_texts)
    except Exception as exc:  # noqa: BLE001 - eager still serves; the log says why
        log.warning("CUDA graphs off, capture failed: %s: %s", type(exc).__name__, exc)
        return None
