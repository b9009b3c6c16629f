"""Write a trained model into the model repository (Triton layout) with its config.pbtxt."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from muxserve.model.weights import TOKENIZER_FILE, load_model, save_model
from muxserve.serving.repository import CONFIG_PBTXT


def default_config(name: str, num_instances: int, num_labels: int, baseline: str = "", max_batch_size: int = 0, batch_texts: int = 0, max_queue_delay_us: int = 2000, max_queue_size: int = 1024, shadow_sample_rate: float = 0.0) -> mc.ModelConfig:
    """TEXT in, LOGITS [C] and LABEL [1] out; a forward pass holds ``batch_texts`` texts
    (default 32 mux groups); requests may carry up to ``max_batch_size`` texts."""
    batch_texts = batch_texts or 32 * num_instances
    cfg = mc.ModelConfig(name=name, backend="muxserve", max_batch_size=max_batch_size or max(64, batch_texts))
    cfg.input.add(name="TEXT", data_type=mc.TYPE_STRING, dims=[1])
    cfg.output.add(name="LOGITS", data_type=mc.TYPE_FP32, dims=[num_labels])
    cfg.output.add(name="LABEL", data_type=mc.TYPE_STRING, dims=[1])
    cfg.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    cfg.dynamic_batching.preferred_batch_size.append(batch_texts)
    cfg.dynamic_batching.default_queue_policy.max_queue_size = max_queue_size
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU)  # count unset: the automatic layout
    cfg.parameters["num_instances"].string_value = str(num_instances)
    if baseline:
        cfg.parameters["baseline"].string_value = baseline
    if shadow_sample_rate > 0:
        cfg.parameters["shadow_sample_rate"].string_value = str(shadow_sample_rate)
    return cfg


def family_config(name: str, members: list[str], num_labels: int, max_batch_size: int = 64, target_queue_delay_ms: float = 500, max_queue_size: int = 1024, accuracy_record: str = "") -> mc.ModelConfig:
    """A model family over ``members`` (Triton's ensemble format, one step per member; see
    ``muxserve.serving.family``)."""
    cfg = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch_size)
    cfg.input.add(name="TEXT", data_type=mc.TYPE_STRING, dims=[1])
    cfg.output.add(name="LOGITS", data_type=mc.TYPE_FP32, dims=[num_labels])
    cfg.output.add(name="LABEL", data_type=mc.TYPE_STRING, dims=[1])
    for member in members:
        step = cfg.ensemble_scheduling.step.add(model_name=member, model_version=-1)
        step.input_map["TEXT"] = "TEXT"
        for out in ("LOGITS", "LABEL"):
            step.output_map[out] = out
    params = {"family_policy": "load_adaptive", "target_queue_delay_ms": f"{target_queue_delay_ms:g}", "max_queue_size": str(max_queue_size), "accuracy_record": accuracy_record}
    for key, value in params.items():
        if value:
            cfg.parameters[key].string_value = value
    return cfg


def write_config(path: str | Path, cfg: mc.ModelConfig) -> None:
    Path(path).write_text(text_format.MessageToString(cfg))


def package_model(source: str | Path, repository: str | Path, name: str, version: int = 1, baseline: str = "", dtype: torch.dtype = torch.float16, config: mc.ModelConfig | None = None, int8_embeddings: bool = True, labels: list[str] | None = None, short_group_policy: str | None = None, mask_group_padding: bool | None = None, **config_kwargs: object) -> Path:
    """Copy a saved model (e.g. a training run's ``best/``) into ``repository/name/version/``
    as fp16 safetensors (word embeddings int8) + tokenizer, and write ``config.pbtxt`` unless
    one exists. ``labels`` renames the classes (e.g. a model trained on 0/1 labels);
    ``short_group_policy`` sets how the model completes a group of fewer than N texts and
    ``mask_group_padding`` whether its encoder sees the positions no text of a group fills."""
    model = load_model(source)
    if labels is not None:
        if len(labels) != model.config.num_labels:
            raise ValueError(f"{len(labels)} label names for a model with {model.config.num_labels} classes")
        model.config.labels = list(labels)
    if short_group_policy is not None:
        model.config = dataclasses.replace(model.config, short_group_policy=short_group_policy)  # validated there
    if mask_group_padding is not None:
        if mask_group_padding and not model.config.is_mux:
            raise ValueError("mask_group_padding is for mux models (the baseline masks all padding)")
        model.config.mask_group_padding = mask_group_padding
    folder = Path(repository) / name
    target = folder / str(version)
    if target.exists():
        shutil.rmtree(target)
    tokenizer = Path(source) / TOKENIZER_FILE
    save_model(model, target, dtype=dtype, tokenizer_file=tokenizer if tokenizer.exists() else None, int8_embeddings=int8_embeddings)
    cfg_path = folder / CONFIG_PBTXT
    if config is not None or not cfg_path.exists():
        write_config(cfg_path, config or default_config(name, model.config.num_instances, model.config.num_labels, baseline, **config_kwargs))
    return target
