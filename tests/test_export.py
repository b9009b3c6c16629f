"""TorchScript export: traced output matches eager for any batch size and length."""

from __future__ import annotations

import json

import pytest
import torch
from muxtiny import make_repository, random_batch, save_tiny, tiny_model

from muxserve.cli import main
from muxserve.model.export import EXPORT_FILE, export_torchscript, fill_short_group, load_exported, scripted_fill_short_group

torch.set_num_threads(1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "n,variant,policy,task,masked",
    [
        (1, "gaussian_hadamard", "copy", "sequence_classification", False),
        (2, "gaussian_hadamard", "copy", "sequence_classification", False),
        (2, "gaussian_hadamard", "pad", "sequence_classification", True),
        (2, "gaussian_attention_v2", "pad", "sequence_classification", False),
        (5, "gaussian_hadamard", "pad", "token_classification", False),
        (5, "gaussian_hadamard", "copy", "token_classification", True),
    ],
)
def test_traced_matches_eager(tmp_path, n: int, variant: str, policy: str, task: str, masked: bool) -> None:
    model = tiny_model(num_instances=n, muxing_variant=variant, short_group_policy=policy, task=task, mask_group_padding=masked)
    folder = save_tiny(model, tmp_path / "m")
    result = export_torchscript(folder, seq_len=16)
    assert result["ok"] and result["max_abs_diff"] <= 1e-4, result
    assert result["out"] == str(folder / EXPORT_FILE)
    # the self-check covered a batch that is not a multiple of N and other lengths
    assert any(c["texts"] % n for c in result["checks"]) or n == 1
    assert len({c["seq_len"] for c in result["checks"]}) >= 3
    traced, config = load_exported(folder / EXPORT_FILE)
    assert config["num_instances"] == n and config["short_group_policy"] == policy and config["mask_group_padding"] == masked
    eager = tiny_model(num_instances=n, muxing_variant=variant, short_group_policy=policy, task=task, mask_group_padding=masked)  # same seed: same weights
    for texts, length in [(2 * n, 16), (3 * n + 1, 7), (1, 30), (n + 1, 12)]:
        ids, mask = random_batch(texts, length, gen(texts * 100 + length))
        with torch.no_grad():
            got, want = traced(ids, mask), eager(ids, mask)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-4, (texts, length)


@pytest.mark.parametrize("policy", ["copy", "pad"])
def test_scripted_fill_matches_model(policy: str) -> None:
    model = tiny_model(num_instances=5, short_group_policy=policy)
    cfg = model.config
    for t in (1, 4, 5, 7, 10, 13):
        ids, mask = random_batch(t, 9, gen(t))
        want = model.fill_short_group(ids, mask)
        for fill in (fill_short_group, scripted_fill_short_group()):
            got = fill(ids, mask, 5, policy == "copy", cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id)
            assert got[0].shape[0] % 5 == 0
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_export_cli_writes_version_folder(tmp_path, capsys) -> None:
    repo = make_repository(tmp_path / "repo", {"tiny-mux2": tiny_model(num_instances=2)})
    assert main(["export", "--model-repository", str(repo), "--model", "tiny-mux2", "--seq-len", "12"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["model"] == "tiny-mux2" and line["ok"] is True and line["max_abs_diff"] <= 1e-4
    assert (repo / "tiny-mux2" / "1" / EXPORT_FILE).exists()
    assert line["dtype"] == "float32"
    out = tmp_path / "elsewhere" / "m.pt"
    assert main(["export", "--model-repository", str(repo), "--model", "tiny-mux2", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out) and out.exists()


def test_export_fp16(tmp_path) -> None:
    """A half-precision export (for GPUs) matches the half-precision eager model."""
    folder = save_tiny(tiny_model(num_instances=2), tmp_path / "m")
    result = export_torchscript(folder, tmp_path / "half.pt", seq_len=12, dtype=torch.float16)
    assert result["ok"] and result["dtype"] == "float16", result
    traced, _ = load_exported(tmp_path / "half.pt")
    ids, mask = random_batch(3, 9, gen(1))
    with torch.no_grad():
        assert traced(ids, mask).dtype == torch.float16
    assert result["bytes"] < export_torchscript(folder, tmp_path / "full.pt", seq_len=12)["bytes"]
