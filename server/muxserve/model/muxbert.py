"""MUX-BERT: a BERT that reads N texts superimposed in one sequence.

Readable top to bottom, no server imports. Shapes: ``d`` hidden size, ``N`` instances
per mux group, ``L`` sequence length, ``B`` mux groups, ``T = B*N`` texts.

Input layout: ``input_ids [T, L]``; rows ``b*N .. b*N+N-1`` form group ``b`` and row
``b*N+i`` sits in slot ``i``. The model multiplexes each group into one sequence
(``gaussian_hadamard`` or the contextual ``gaussian_attention_v2``), runs the encoder
once per group, and demultiplexes the output back into one representation per slot
(``index_pos``). With ``num_instances == 1`` it is a plain BERT classifier: no keys, no
demux, the encoder sees the padding mask — the baseline the mux models are compared to.

State-dict names follow the reference implementation (princeton-nlp/datamux-pretraining)
so that its checkpoints convert by renaming only: ``bert.embeddings.*``,
``bert.encoder.layer.{i}.*``, ``instance_embedding``, ``demux_module.*``,
``demultiplexer.pre_decoder*``, ``classifier``, ``retrieval_head.*``.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MUXING_VARIANTS = ("gaussian_hadamard", "gaussian_attention_v2")
DEMUXING_VARIANTS = ("index_pos",)
TASKS = ("sequence_classification", "token_classification")
SHORT_GROUP_POLICIES = ("copy", "pad")


@dataclass
class MuxBertConfig:
    # backbone (BERT / MiniLM)
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    # multiplexing
    num_instances: int = 1
    muxing_variant: str = "gaussian_hadamard"
    demuxing_variant: str = "index_pos"
    gaussian_hadamard_norm: float = 1.0
    # mean of the key distribution, v_i ~ N(mean, I_d) before scaling; 0 is the reference. A mean
    # keeps the keyed input near a plain rescaling of the embeddings, which a pre-trained encoder
    # reads as it is (docs/training/probes/copy_groups_probe.py), while the noise still tells the slots apart.
    gaussian_hadamard_mean: float = 0.0
    learn_muxing: bool = False
    num_hidden_demux_layers: int = 2
    # Fill for groups with fewer than N texts: "copy" repeats real texts of the group (the
    # reference's choice), "pad" uses an empty [CLS][SEP] text. Filler outputs are dropped.
    short_group_policy: str = "copy"
    # Hide from the encoder the positions that are padding in every slot of a group. Off is the
    # reference (no padding mask at all; its checkpoints expect that): there a group's outputs
    # depend on how far its batch was padded, i.e. on the other groups batched with it.
    mask_group_padding: bool = False
    # The int8 serving precision quantizes the encoder's projections from this layer on. The first
    # layer reads the embeddings (for a mux model their superposition), whose outliers int8 rounds
    # worst: quantizing it too flipped 0.50% of sst2-bert's labels against fp32 on SST-2 training
    # sentences, sparing it 0.27%; for sst2-mux5 0.43% against 0.37%, for 1.1x the speed
    # (docs/bench/engine.md). 0: every layer (the bundled mux models).
    int8_first_layer: int = 1
    # head
    task: str = "sequence_classification"
    labels: list[str] = field(default_factory=lambda: ["negative", "positive"])
    max_seq_length: int = 128
    seed: int = 0  # seeds the fixed instance keys

    def __post_init__(self) -> None:
        if self.num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {self.num_instances}")
        if self.muxing_variant not in MUXING_VARIANTS:
            raise ValueError(f"unknown muxing_variant {self.muxing_variant!r}; one of {MUXING_VARIANTS}")
        if self.demuxing_variant not in DEMUXING_VARIANTS:
            raise ValueError(f"unknown demuxing_variant {self.demuxing_variant!r}; one of {DEMUXING_VARIANTS}")
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; one of {TASKS}")
        if self.short_group_policy not in SHORT_GROUP_POLICIES:
            raise ValueError(f"unknown short_group_policy {self.short_group_policy!r}; one of {SHORT_GROUP_POLICIES}")
        if not 0 <= self.int8_first_layer <= self.num_hidden_layers:
            raise ValueError(f"int8_first_layer must be in [0, {self.num_hidden_layers}], got {self.int8_first_layer}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def is_mux(self) -> bool:
        return self.num_instances > 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MuxBertConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------- BERT backbone


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: MuxBertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if inputs_embeds is None:
            assert input_ids is not None
            inputs_embeds = self.word_embeddings(input_ids)
        seq_len = inputs_embeds.shape[1]
        # token type 0 everywhere: single-sentence tasks
        x = inputs_embeds + self.position_embeddings.weight[:seq_len] + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))

    def packed(self, positions: torch.Tensor, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """``forward`` for inference over packed tokens at ``positions [P]``: ids ``[P]`` (or
        ``[P, N]``, N texts at each position) or embeddings ``[P, d]`` (``[P, N, d]``)."""
        if inputs_embeds is None:
            assert input_ids is not None
            inputs_embeds = self.word_embeddings(input_ids)
        extra = self.position_embeddings.weight.index_select(0, positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(inputs_embeds + (extra[:, None] if inputs_embeds.dim() == 3 else extra))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: MuxBertConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        b, length, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        dropout = self.dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout)
        return out.transpose(1, 2).reshape(b, length, d)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: MuxBertConfig, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: MuxBertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, attn_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: MuxBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: MuxBertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attention(x, attn_bias)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, cfg: MuxBertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, attn_bias)
        return x


# packed rows are padded to a multiple of this for oneDNN's prepacked (bf16) matmuls, which build
# a kernel per row count; to a multiple of PLAIN_ROWS_MULTIPLE for the plain ones (MKL fp32, cuBLAS),
# which build none: there the padding rows are only work (25-text passes of sst2-mux5 in fp32 ran
# 1.08x faster at 8 than at 64 in arrival order, 1.16x with groups sorted, docs/bench/engine.md)
PACKED_ROWS_MULTIPLE = 64
PLAIN_ROWS_MULTIPLE = 8
ATTENTION_MULTIPLE = 16


@functools.cache
def onednn_bf16_available() -> bool:
    """oneDNN's prepacked bf16 matmul runs on this CPU (it needs AVX512BW/VL/DQ or AVX-NE-CONVERT;
    elsewhere a bf16 model keeps the plain layout)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class InferenceLinear:
    """One or more Linears that read the same input, as one projection for inference: their
    weights side by side (Q, K and V in one matmul), in oneDNN's prepacked layout on a CPU in
    bf16 (``pack``), where the matmul runs faster than from the plain layout and GELU runs
    fused into it, or as FBGEMM's dynamic int8 matmul (``int8``, an fp32 CPU model). Built from
    the model's own weights, which it does not change."""

    def __init__(self, *linears: nn.Linear, pack: bool = False, int8: bool = False) -> None:
        weight = torch.cat([lin.weight.detach() for lin in linears]) if len(linears) > 1 else linears[0].weight.detach()
        self.bias = torch.cat([lin.bias.detach() for lin in linears]) if len(linears) > 1 else linears[0].bias.detach()
        self.onednn = pack and weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and onednn_bf16_available()
        self.int8 = int8_linear_weight(weight, self.bias) if int8 else None
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, None) if self.onednn else weight

    def __call__(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        if self.onednn:  # "none": GELU's erf form, as F.gelu
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu" if gelu else "none", [], "none" if gelu else "")
        if self.int8 is not None:
            # the pass's activations quantized over their own range (the full 8 bits: the
            # reduced 7-bit range cost sst2-bert a point of SST-2 dev accuracy)
            y = torch.ops.quantized.linear_dynamic(x, self.int8, False)
        else:
            y = F.linear(x, self.weight, self.bias)
        return F.gelu(y) if gelu else y


def int8_linear_weight(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``weight [out, in]`` as symmetric int8 per output row, packed with ``bias`` for FBGEMM's
    dynamic int8 matmul (``torch.ops.quantized.linear_dynamic``), which runs 1.6-1.85x the fp32
    matmul's rate on an AVX2 CPU at the encoder's shapes."""
    weight = weight.float()
    scale = (weight.abs().amax(1) / 127).clamp_min(1e-12).double()
    with warnings.catch_warnings():  # torch marks its quantized tensors for replacement; 2.13 runs them
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_channel(weight, scale, torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(q, bias.float())


class InferenceLayer:
    """An encoder layer's projections for ``packed_cls_states``: fused QKV, the attention
    output, the feed-forward in (with its GELU) and out. The layer norms stay the layer's.
    The encoder's last layer (``last``) queries from position 0 alone: its queries are a
    projection of their own (``query``), apart from the keys and values every token needs
    (``key_value``), and it has no fused QKV."""

    def __init__(self, layer: BertLayer, pack: bool = False, int8: bool = False, last: bool = False) -> None:
        att = layer.attention.self
        self.num_heads, self.head_dim = att.num_heads, att.head_dim
        self.qkv = None if last else InferenceLinear(att.query, att.key, att.value, pack=pack, int8=int8)
        self.query = InferenceLinear(att.query, pack=pack, int8=int8) if last else None
        self.key_value = InferenceLinear(att.key, att.value, pack=pack, int8=int8) if last else None
        self.attention_out = InferenceLinear(layer.attention.output.dense, pack=pack, int8=int8)
        self.attention_norm = layer.attention.output.LayerNorm
        self.ffn_in = InferenceLinear(layer.intermediate.dense, pack=pack, int8=int8)
        self.ffn_out = InferenceLinear(layer.output.dense, pack=pack, int8=int8)
        self.ffn_norm = layer.output.LayerNorm


def inference_layers(encoder: BertEncoder, pack: bool = False, int8: bool = False, int8_first_layer: int = 0) -> list[InferenceLayer]:
    """``InferenceLayer``s of an encoder; with ``int8``, those from ``int8_first_layer`` on in int8."""
    last = len(encoder.layer) - 1
    return [InferenceLayer(layer, pack, int8 and i >= int8_first_layer, last=i == last) for i, layer in enumerate(encoder.layer)]


@dataclass(frozen=True)
class AttentionSpan:
    """Consecutive rows of a packed pass whose attention runs padded to one ``length``: rows
    ``rows[0]:rows[1]``, their tokens ``tokens[0]:tokens[1]`` of the packed order, ``flat`` the
    tokens' places in the padded ``[rows * length]`` layout, ``gather`` the packed token each
    place of that layout reads (a padding place its sequence's first token: the mask hides it,
    and one gather is cheaper than zeros and a scatter), ``bias`` the padding mask."""

    rows: tuple[int, int]
    tokens: tuple[int, int]
    length: int
    flat: torch.Tensor
    gather: torch.Tensor
    bias: torch.Tensor


def prefix_lengths(mask: torch.Tensor) -> torch.Tensor | None:
    """Each row's length where every row of the 1/0 ``mask [B, L]`` is a prefix of ones of at
    least one (texts padded at their end, as tokenized); else None."""
    lengths = mask.sum(1)
    if not bool((lengths > 0).all()):
        return None
    if not bool((mask.bool() == (torch.arange(mask.shape[1], device=mask.device) < lengths[:, None])).all()):
        return None
    return lengths


def packed_positions(lengths: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(places in ``[B * length]`` of each row's first ``lengths`` tokens, row after row; their
    positions within their row)."""
    flat = (torch.arange(length, device=lengths.device) < lengths[:, None]).reshape(-1).nonzero().squeeze(1)
    return flat, flat % length


def attention_length(tokens: int) -> int:
    """The padded length attention runs at: at least ``ATTENTION_MULTIPLE`` and a multiple of it
    (torch's CPU attention kernel works in blocks of that many positions and runs 1.5-3x slower
    on a length between them: 40 or 56 against 48 or 64)."""
    return max(ATTENTION_MULTIPLE, -(-tokens // ATTENTION_MULTIPLE) * ATTENTION_MULTIPLE)


def attention_spans(lengths: list[int], dtype: torch.dtype, device: torch.device, by_length: bool) -> list[AttentionSpan]:
    """``AttentionSpan``s over rows of these lengths (tokens packed row after row): one span
    padded to the longest, or (``by_length``, rows in ascending ``attention_length``) a span per
    padded length. Attention's cost grows faster than its length (6 sequences of 12 x 32 heads
    on one core, fp32: 2x the time at 32 positions as at 16, 4x at 48, 6.3x at 64;
    ``benchmarks/attention_lengths.py --batch 6 --lengths 16,32,48,64 --dtype fp32``), so a
    pass of short groups and one long one runs the short ones short."""
    padded = [attention_length(n) for n in lengths]
    bounds = [0, len(lengths)]
    if by_length:
        bounds[1:1] = [i for i in range(1, len(lengths)) if padded[i] != padded[i - 1]]
    spans, token = [], 0
    for r0, r1 in itertools.pairwise(bounds):
        length = max(padded[r0:r1])
        part = torch.tensor(lengths[r0:r1], device=device)
        count = sum(lengths[r0:r1])
        valid = torch.arange(length, device=device) < part[:, None]
        flat = packed_positions(part, length)[0]
        firsts = torch.cumsum(part, 0) - part + token  # each sequence's first token in the packed order
        gather = firsts.repeat_interleave(length).index_copy_(0, flat, torch.arange(token, token + count, device=device))
        spans.append(AttentionSpan((r0, r1), (token, token + count), length, flat, gather, padding_bias(valid, dtype)))
        token += count
    return spans


def packed_cls_states(layers: list[InferenceLayer], h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Inference: the encoder's output at position 0 of each sequence, ``[B, d]``, the same as
    ``encoder(x, padding_bias(valid))[:, 0]`` for less work.

    ``h [P, d]``: the sequences' real tokens packed, sequence after sequence (``lengths [B]``
    tokens each, at least 1; ``BertEmbeddings.packed``). Every projection and feed-forward runs on
    the real tokens only; attention runs padded (``attention_spans``), with the padding masked
    as usual: on a CPU, the sequences are taken in order of length so that each span of
    similar lengths pads to its own longest. The last layer computes keys and values for every
    token but the attention output and feed-forward for position 0 alone: nothing else is read."""
    counts = lengths.tolist()
    by_length = h.device.type == "cpu"
    order = None
    if by_length and any(attention_length(a) > attention_length(b) for a, b in itertools.pairwise(counts)):
        rows = sorted(range(len(counts)), key=lambda i: attention_length(counts[i]))
        pieces = h.split(counts)
        h = torch.cat([pieces[i] for i in rows])
        counts = [counts[i] for i in rows]
        order = torch.tensor(rows, device=h.device)
        lengths = lengths.index_select(0, order)
    spans = attention_spans(counts, h.dtype, h.device, by_length)
    first = torch.cumsum(lengths, 0) - lengths  # each sequence's position 0 among the packed tokens
    # oneDNN builds a kernel for every new row count of a matmul, which costs more than the
    # matmul itself: its packed rows are padded to a multiple of PACKED_ROWS_MULTIPLE so that
    # passes share a few row counts (and their cached kernels); the padding rows are dropped
    multiple = PACKED_ROWS_MULTIPLE if layers and layers[0].attention_out.onednn else PLAIN_ROWS_MULTIPLE
    h = F.pad(h, (0, 0, 0, -h.shape[0] % multiple))
    for i, layer in enumerate(layers):
        h = _packed_layer(layer, h, spans, first if i == len(layers) - 1 else None)
    if order is not None:
        h = torch.empty_like(h).index_copy_(0, order, h)
    return h


def _packed_layer(layer: InferenceLayer, h: torch.Tensor, spans: list[AttentionSpan], query_rows: torch.Tensor | None) -> torch.Tensor:
    """One encoder layer over packed tokens ``h [P, d]``; with ``query_rows`` (each sequence's
    position 0; the last layer, built with ``last``), only those rows are queried and come out
    (``[B, d]``)."""
    d, heads, head_dim = h.shape[1], layer.num_heads, layer.head_dim
    if query_rows is None:
        projected = layer.qkv(h)  # [P, 3d]
    else:
        queries = layer.query(h.index_select(0, query_rows))  # [B, d]
        projected = layer.key_value(h)  # [P, 2d]
    contexts = []
    for span in spans:
        rows = span.rows[1] - span.rows[0]
        padded = projected.index_select(0, span.gather).view(rows, span.length, -1, heads, head_dim).permute(2, 0, 3, 1, 4)  # each [rows, heads, L, head_dim]
        if query_rows is None:
            q, k, v = padded
            contexts.append(F.scaled_dot_product_attention(q, k, v, attn_mask=span.bias).transpose(1, 2).reshape(rows * span.length, d).index_select(0, span.flat))
        else:
            q = queries[span.rows[0] : span.rows[1]].view(rows, 1, heads, head_dim).transpose(1, 2)
            k, v = padded
            contexts.append(F.scaled_dot_product_attention(q, k, v, attn_mask=span.bias).transpose(1, 2).reshape(rows, d))
    context = contexts[0] if len(contexts) == 1 else torch.cat(contexts)
    if query_rows is None:
        residual = h
        context = F.pad(context, (0, 0, 0, h.shape[0] - context.shape[0]))  # the padding rows again
    else:
        residual = h.index_select(0, query_rows)
    a = layer.attention_norm(layer.attention_out(context) + residual)
    return layer.ffn_norm(layer.ffn_out(layer.ffn_in(a, gelu=True)) + a)


class BertModel(nn.Module):
    """Embeddings + encoder, no pooler (neither the mux heads nor ours use it)."""

    def __init__(self, cfg: MuxBertConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)


def padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T, L] 1/0 mask -> additive bias [T, 1, 1, L] for scaled_dot_product_attention."""
    bias = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    return bias


def random_instance_keys(num_instances: int, dim: int, norm: float, seed: int, mean: float = 0.0) -> torch.Tensor:
    """Fixed keys v_i ~ N(mean, I_d), each scaled to unit L2 norm times ``norm`` (the reference:
    mean 0; the same draws for any mean).

    Unit norm puts E * v_i at the scale of raw word embeddings (~1/sqrt(d) per element), which
    is what the second pass through the embedding layer expects.
    """
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(num_instances, dim, generator=gen) + mean
    return keys / keys.norm(dim=-1, keepdim=True) * norm


def fill_short_group(input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int, copy: bool, cls_id: int, sep_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``T`` texts to a multiple of ``n``: ``copy`` repeats the real texts of the short group
    round robin (the reference's choice); otherwise empty [CLS][SEP] texts. Filler outputs are
    dropped by the caller. A plain function so that TorchScript can compile it (export)."""
    t = input_ids.size(0)
    missing = (n - t % n) % n
    if missing == 0:
        return input_ids, attention_mask
    if copy:
        real = n - missing
        idx = (t - real) + torch.arange(missing, device=input_ids.device) % real
        return torch.cat([input_ids, input_ids[idx]]), torch.cat([attention_mask, attention_mask[idx]])
    fill_ids = torch.full([missing, input_ids.size(1)], pad_id, dtype=input_ids.dtype, device=input_ids.device)
    fill_ids[:, 0] = cls_id
    fill_ids[:, 1] = sep_id
    fill_mask = torch.zeros_like(fill_ids, dtype=attention_mask.dtype)
    fill_mask[:, :2] = 1
    return torch.cat([input_ids, fill_ids]), torch.cat([attention_mask, fill_mask])


# --------------------------------------------------------------------------- demultiplexing


class IndexPosDemuxModule(nn.Module):
    """Learned instance keys k_i and the demux MLP shared by the classifier and retrieval heads."""

    def __init__(self, cfg: MuxBertConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.demux_instance_embedding = nn.Parameter(torch.randn(cfg.num_instances, d) * 0.02)
        self.dense_1 = nn.Linear(2 * d, d)
        self.dense_2 = nn.Linear(d, d)

    def mlp(self, keys: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """z = concat(k, h); x1 = gelu(dense_1 z); x2 = gelu(dense_2 x1) + x1."""
        x1 = F.gelu(self.dense_1(torch.cat([keys, h], dim=-1)))
        return F.gelu(self.dense_2(x1)) + x1

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, L, d] -> per-slot features [B*N, L, d], slot-major within each group."""
        b, length, d = h.shape
        n = self.demux_instance_embedding.shape[0]
        keys = self.demux_instance_embedding[None, :, None, :].expand(b, n, length, d)
        return self.mlp(keys, h[:, None].expand(b, n, length, d)).reshape(b * n, length, d)


class PreDecoder(nn.Module):
    """out = LayerNorm(gelu(pre_decoder(x))) + x."""

    def __init__(self, cfg: MuxBertConfig) -> None:
        super().__init__()
        self.pre_decoder = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.pre_decoder_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_decoder_layer_norm(F.gelu(self.pre_decoder(x))) + x


class RetrievalHead(PreDecoder):
    """Priming head: per-slot MLP, pre-decoder, then a decoder tied to the word embeddings."""

    def __init__(self, cfg: MuxBertConfig) -> None:
        super().__init__(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def decode(self, h: torch.Tensor, slot: torch.Tensor, demux: IndexPosDemuxModule, word_embeddings: torch.Tensor) -> torch.Tensor:
        """h [B, L, d], slot [B, L] (which slot to read at each position) -> logits [B, L, V]."""
        x = self(demux.mlp(demux.demux_instance_embedding[slot], h))
        return F.linear(x, word_embeddings, self.bias)


# --------------------------------------------------------------------------- the model


def ensemble_order(texts: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Ensembled prediction's layout: every text ``n`` times, each copy placed by a fresh
    random permutation, so that a text's copies sit in different slots beside different
    partners. Row ``i`` of the pass is text ``order[i]``."""
    return torch.cat([torch.randperm(texts, generator=generator) for _ in range(n)])


def mean_of_copies(logits: torch.Tensor, order: torch.Tensor, texts: int, n: int) -> torch.Tensor:
    """Logits of a pass laid out by ``ensemble_order`` -> each text's mean over its copies."""
    summed = torch.zeros((texts, *logits.shape[1:]), dtype=logits.dtype, device=logits.device)
    summed.index_add_(0, order.to(logits.device), logits)
    return summed / n


class MuxBertModel(nn.Module):
    """MUX-BERT classifier (sequence or token level); N=1 is the plain BERT baseline."""

    def __init__(self, cfg: MuxBertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg)
        n, d = cfg.num_instances, cfg.hidden_size
        if cfg.is_mux:
            keys = random_instance_keys(n, d, cfg.gaussian_hadamard_norm, cfg.seed, cfg.gaussian_hadamard_mean)
            self.instance_embedding = nn.Parameter(keys, requires_grad=cfg.learn_muxing)
            if cfg.muxing_variant == "gaussian_attention_v2":
                self.muxing_attention = BertLayer(cfg)
                self.muxing_attention_2 = BertLayer(cfg)
            self.demux_module = IndexPosDemuxModule(cfg)
            self.demultiplexer = PreDecoder(cfg)
            self.retrieval_head = RetrievalHead(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.classifier = nn.Linear(d, cfg.num_labels)
        self._init_new_weights()
        self.serving_layers: list[InferenceLayer] | None = None  # freeze_for_serving

    def freeze_for_serving(self, int8: bool = False) -> MuxBertModel:
        """Promise that the weights no longer change (a served model), so that ``predict`` keeps
        its encoder's projections in the layouts it runs fastest (``InferenceLayer``: fused QKV,
        oneDNN-prepacked on CPU in bf16, ``int8``: dynamic int8 from the config's
        ``int8_first_layer`` on, an fp32 CPU model) instead of building them at every pass.
        Training mode drops them: call again after changing the weights."""
        if int8 and (next(self.parameters()).dtype != torch.float32 or next(self.parameters()).device.type != "cpu"):
            raise ValueError("int8 projections are built from an fp32 model on CPU")
        self.serving_layers = inference_layers(self.bert.encoder, pack=True, int8=int8, int8_first_layer=self.config.int8_first_layer)
        return self

    def train(self, mode: bool = True) -> MuxBertModel:
        if mode:
            self.serving_layers = None  # training changes the weights they were built from
        return super().train(mode)

    def _init_new_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    # ---------------------------------------------------------------- mux / encode / demux

    def multiplex(self, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B*N, L, d] instance embeddings -> [B, L, d] one superimposed sequence per group."""
        n = self.config.num_instances
        t, length, d = embeddings.shape
        b = t // n
        keys = self.instance_embedding[None, :, None, :]  # [1, N, 1, d]
        if self.config.muxing_variant == "gaussian_hadamard":
            return (embeddings.view(b, n, length, d) * keys).mean(dim=1)
        # gaussian_attention_v2: contextualise each instance, key it, then attend across the
        # N instances at every position; mean of (cross-instance output + keyed input).
        a1 = self.muxing_attention(embeddings, padding_bias(attention_mask, embeddings.dtype)) + embeddings
        keyed = a1.view(b, n, length, d) * keys
        across = keyed.permute(0, 2, 1, 3).reshape(b * length, n, d)
        slot_mask = attention_mask.view(b, n, length).permute(0, 2, 1).reshape(b * length, n)
        # a position where every instance is padding would attend to nothing: let it see all
        slot_mask = torch.where(slot_mask.sum(-1, keepdim=True) > 0, slot_mask, torch.ones_like(slot_mask))
        a2 = self.muxing_attention_2(across, padding_bias(slot_mask, embeddings.dtype))
        a2 = a2.view(b, length, n, d).permute(0, 2, 1, 3)
        return (a2 + keyed).mean(dim=1)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, packed_cls: bool = False) -> torch.Tensor:
        """Token ids [B*N, L] -> encoder output [B, L, d] (for N=1: [T, L, d]). ``packed_cls``
        (inference): position 0 alone, [B, 1, d], computed on real tokens only
        (``packed_cls_states``) where the encoder masks padding."""
        emb = self.bert.embeddings
        length = input_ids.shape[1]
        if not self.config.is_mux:
            lengths = prefix_lengths(attention_mask) if packed_cls else None
            if lengths is not None:
                flat, positions = packed_positions(lengths, length)
                h = emb.packed(positions, input_ids=input_ids.reshape(-1).index_select(0, flat))
                return packed_cls_states(self.inference_layers(), h, lengths)[:, None]
            x = emb(input_ids=input_ids)
            return self.bert.encoder(x, padding_bias(attention_mask, x.dtype))
        n = self.config.num_instances
        # index_pos reads every slot from the shared position 0: force [CLS] there
        input_ids = torch.cat([torch.full_like(input_ids[:, :1], self.config.cls_token_id), input_ids[:, 1:]], dim=1)
        # As the reference (and its checkpoints): the mixture goes through the embedding layer
        # again as inputs_embeds, and the encoder runs without a padding mask unless the
        # model masks the group's padding (a position no slot fills).
        group_mask = attention_mask.view(-1, n, length).amax(dim=1) if self.config.mask_group_padding else None
        lengths = prefix_lengths(group_mask) if packed_cls and group_mask is not None else None
        if lengths is not None:
            flat, positions = packed_positions(lengths, length)
            if self.config.muxing_variant == "gaussian_hadamard":
                # each position mixes on its own: only the positions some slot fills are mixed
                ids = input_ids.view(-1, n, length).transpose(1, 2).reshape(-1, n).index_select(0, flat)  # [P, N]
                mixed = (emb.packed(positions, input_ids=ids) * self.instance_embedding).mean(dim=1)
                h = emb.packed(positions, inputs_embeds=mixed)
            else:
                x = emb(inputs_embeds=self.multiplex(emb(input_ids=input_ids), attention_mask))
                h = x.reshape(-1, x.shape[-1]).index_select(0, flat)
            return packed_cls_states(self.inference_layers(), h, lengths)[:, None]
        x = emb(inputs_embeds=self.multiplex(emb(input_ids=input_ids), attention_mask))
        return self.bert.encoder(x, None if group_mask is None else padding_bias(group_mask, x.dtype))

    def inference_layers(self) -> list[InferenceLayer]:
        return self.serving_layers or inference_layers(self.bert.encoder)

    def demultiplex(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, L', d] -> [B*N, L', d]; identity for the baseline."""
        if not self.config.is_mux:
            return hidden
        return self.demultiplexer(self.demux_module(hidden))

    # ---------------------------------------------------------------- public forward

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits for T texts: [T, C] (sequence) or [T, L, C] (token). T need not divide by N."""
        t = input_ids.shape[0]
        input_ids, attention_mask = self.fill_short_group(input_ids, attention_mask)
        cls_only = self.config.task == "sequence_classification"
        logits = self.classify(self.slot_features(input_ids, attention_mask, cls_only))
        return logits[:t]

    @torch.inference_mode()
    def predict(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``forward`` for serving: the same logits, for less work where the task reads position
        0 alone (sequence classification): the encoder computes the real tokens only and its
        last layer position 0 only (``packed_cls_states``)."""
        if self.training or self.config.task != "sequence_classification":
            return self.forward(input_ids, attention_mask)
        t = input_ids.shape[0]
        input_ids, attention_mask = self.fill_short_group(input_ids, attention_mask)
        return self.classify(self.slot_features_from(self.encode(input_ids, attention_mask, packed_cls=True), cls_only=True))[:t]

    def slot_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cls_only: bool) -> torch.Tensor:
        """Per-text final hidden states [T, L', d] (T a multiple of N): demultiplexed for N > 1,
        the encoder output for N=1. ``cls_only`` demultiplexes position 0 alone (L' = 1)."""
        return self.slot_features_from(self.encode(input_ids, attention_mask), cls_only)

    def slot_features_from(self, hidden: torch.Tensor, cls_only: bool) -> torch.Tensor:
        """``slot_features`` over an encoder output already at hand (``encode``)."""
        if cls_only:
            hidden = hidden[:, :1]  # the shared [CLS] position only
        return self.demultiplex(hidden)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Head over ``slot_features``: [T, C] from position 0 (sequence) or [T, L, C] (token)."""
        logits = self.classifier(self.dropout(features))
        return logits[:, 0] if self.config.task == "sequence_classification" else logits

    def fill_short_group(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Complete a short last group by the model's policy (see ``fill_short_group``)."""
        cfg = self.config
        return fill_short_group(input_ids, attention_mask, cfg.num_instances, cfg.short_group_policy == "copy", cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id)

    @torch.no_grad()
    def predict_ensemble(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Ensembled logits [T, C]: each text runs N times, copies scattered over slots and groups
        by a fresh random permutation per copy, logits of the copies averaged (N times the compute)."""
        n, t = self.config.num_instances, input_ids.shape[0]
        if n == 1:
            return self.forward(input_ids, attention_mask)
        order = ensemble_order(t, n, generator)
        return mean_of_copies(self.forward(input_ids[order], attention_mask[order]), order, t, n)

    # ---------------------------------------------------------------- training losses

    def retrieval_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator | None = None, fraction: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Priming: at every position pick a random slot; predict that slot's token there.

        Pads and the forced [CLS] are excluded, and the vocabulary projection (the costly part)
        runs only on the P scored positions, a random ``fraction`` of them if < 1.
        Returns (logits [P, V], targets [P]).
        """
        return self.retrieval_logits_from(self.encode(input_ids, attention_mask), input_ids, attention_mask, generator, fraction)

    def retrieval_logits_from(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator | None = None, fraction: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``retrieval_logits`` over an encoder output already at hand (``encode``), so that
        fine-tuning scores its auxiliary retrieval term on the pass that classifies."""
        n = self.config.num_instances
        b, length, _ = hidden.shape
        slot = torch.randint(n, (b, length), generator=generator).to(hidden.device)
        pick = slot[:, None, :]
        targets = input_ids.view(b, n, length).gather(1, pick)[:, 0]
        scored = attention_mask.view(b, n, length).gather(1, pick)[:, 0].bool()
        scored[:, 0] = False
        if fraction < 1.0:
            scored &= torch.rand(scored.shape, generator=generator).to(scored.device) < fraction
        logits = self.retrieval_head.decode(hidden[scored], slot[scored], self.demux_module, self.bert.embeddings.word_embeddings.weight)
        return logits, targets[scored]

    def mlm_logits(self, masked_ids: torch.Tensor, attention_mask: torch.Tensor, mlm_positions: torch.Tensor) -> torch.Tensor:
        """MLM with multiplexing: logits [P, V] for the P True entries of ``mlm_positions [T, L]``,
        each read from its own slot of the muxed output."""
        n = self.config.num_instances
        hidden = self.encode(masked_ids, attention_mask)
        rows, cols = mlm_positions.nonzero(as_tuple=True)
        h = hidden[rows // n, cols]
        return self.retrieval_head.decode(h, rows % n, self.demux_module, self.bert.embeddings.word_embeddings.weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
