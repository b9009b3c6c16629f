"""scripts/weights_pack.py: a model folder travels in parts and comes back bit for bit."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("weights_pack", ROOT / "scripts" / "weights_pack.py")
weights_pack = importlib.util.module_from_spec(spec)
spec.loader.exec_module(weights_pack)


@pytest.mark.parametrize("extra_byte", [False, True])
def test_pack_unpack_round_trip(tmp_path, monkeypatch, extra_byte: bool) -> None:
    monkeypatch.setattr(weights_pack, "PART_BYTES", 1000)  # force several low-byte parts
    src = tmp_path / "model"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(40, 30, generator=g).half(), "b": torch.randn(17, generator=g).half()}
    if extra_byte:  # a body of odd length (an int8 tensor of odd size)
        tensors["c"] = torch.arange(3, dtype=torch.int8)
    save_file(tensors, str(src / "model.safetensors"))
    (src / "muxbert.json").write_text('{"num_instances": 2}\n')
    (src / "tokenizer.json").write_text("{}")
    parts = weights_pack.pack(src, tmp_path / "p" / "m", tokenizer=False)
    assert len(parts) >= 3 and all(p.stat().st_size <= 1000 for p in parts[1:])
    out = weights_pack.unpack(tmp_path / "p" / "m", tmp_path / "back")
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert (out / "muxbert.json").read_text() == '{"num_instances": 2}\n'
    assert not (out / "tokenizer.json").exists()
    parts[-1].unlink()
    with pytest.raises(ValueError, match="a part is missing"):
        weights_pack.unpack(tmp_path / "p" / "m", tmp_path / "again")
