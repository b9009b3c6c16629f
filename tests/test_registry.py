"""The model registry: config.pbtxt settings, and a model that fails to load next to good ones."""

from __future__ import annotations

from pathlib import Path

import httpx
from helpers import make_tiny_repository
from serving import serving
from tritonclient.grpc import model_config_pb2 as mc

from muxserve.model.packaging import default_config
from muxserve.serving.registry import batch_texts, engine_options
from muxserve.serving.repository import ModelEntry, scan
from muxserve.serving.settings import Settings


def entry(cfg: mc.ModelConfig) -> ModelEntry:
    return ModelEntry(cfg.name, Path("."), cfg)


def test_batch_texts_from_preferred_batch_size_in_whole_groups() -> None:
    assert batch_texts(entry(default_config("m", 5, 2, batch_texts=160)), 5) == 160
    cfg = default_config("m", 5, 2, batch_texts=64)  # 64 is not a multiple of 5: whole groups only
    assert batch_texts(entry(cfg), 5) == 60
    cfg.ClearField("dynamic_batching")
    cfg.max_batch_size = 48
    assert batch_texts(entry(cfg), 2) == 48


def test_engine_options_from_instance_group_and_flags() -> None:
    cfg = default_config("m", 2, 2)
    del cfg.instance_group[:]
    cfg.instance_group.add(count=2, kind=mc.ModelInstanceGroup.KIND_GPU, gpus=[1])
    cfg.parameters["precision"].string_value = "fp16"
    opts = engine_options(entry(cfg), Settings())
    assert (opts.device, opts.instances, opts.precision, opts.kind) == ("cuda:1", 2, "fp16", "eager")
    cpu = engine_options(entry(cfg), Settings(device="cpu", engine="torchscript"))
    assert (cpu.device, cpu.precision, cpu.kind) == ("cpu", "fp32", "torchscript")  # half precision is CUDA only


def test_version_policy_and_folders(tmp_path: Path) -> None:
    make_tiny_repository(tmp_path, {"m": 2})
    (tmp_path / "m" / "3").mkdir()
    e = scan(tmp_path)["m"]
    assert sorted(e.versions) == [1, 3] and e.served_versions() == [3]
    e.config.version_policy.all.SetInParent()
    assert e.served_versions() == [1, 3]


def test_a_model_that_fails_to_load_is_not_ready_and_the_others_serve(tmp_path: Path) -> None:
    repo = make_tiny_repository(tmp_path / "repo", {"good": 2, "bad-weights": 1, "bad-config": 1})
    (repo / "bad-weights" / "1" / "model.safetensors").write_bytes(b"not a safetensors file")
    cfg = (repo / "bad-config" / "config.pbtxt").read_text().replace("TYPE_STRING", "TYPE_INT32", 1)
    (repo / "bad-config" / "config.pbtxt").write_text(cfg)
    with serving(repo, tmp_path / "server.log") as server:
        base = f"http://{server.http_url}"
        assert httpx.get(f"{base}/v2/health/ready").status_code == 200
        assert httpx.get(f"{base}/v2/models/good/ready").status_code == 200
        index = {row["name"]: row for row in httpx.post(f"{base}/v2/repository/index").json()}
        assert index["good"]["state"] == "READY"
        for name in ("bad-weights", "bad-config"):
            assert index[name]["state"] == "UNAVAILABLE" and index[name]["reason"], index[name]
            assert httpx.get(f"{base}/v2/models/{name}/ready").status_code == 503
            r = httpx.post(f"{base}/v2/models/{name}/infer", json={"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "data": ["x"]}]})
            assert r.status_code == 503 and "not ready" in r.json()["error"]
        assert "TEXT of TYPE_STRING" in index["bad-config"]["reason"]
        ok = httpx.post(f"{base}/v1/classify", json={"model": "good", "inputs": ["fine"]})
        assert ok.status_code == 200 and ok.json()[0]["label"] in ("negative", "positive")
