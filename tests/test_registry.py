"""The model registry: config.pbtxt settings, and a model that fails to load next to good ones."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from helpers import make_tiny_repository
from serving import serving
from tritonclient.grpc import model_config_pb2 as mc

from muxserve.cli import build_parser
from muxserve.cli.serve import settings_from_args
from muxserve.model.packaging import default_config
from muxserve.model.precision import resolve_precision
from muxserve.serving.engine import AUTO_CPU_INSTANCES, engine_layout
from muxserve.serving.registry import AUTO_PASS_FILL_US, AUTO_TOKENS_PER_GROUP, batch_texts, engine_options, max_texts, pass_fill_seconds, token_budget
from muxserve.serving.repository import ModelEntry, RepositoryError, scan
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
    # the config's fp16 is CUDA only: on a CPU the CPU's automatic choice serves
    assert (cpu.device, cpu.precision, cpu.kind) == ("cpu", resolve_precision("auto", "cpu", engine="torchscript"), "torchscript")  # int8 is the eager engine's
    with pytest.raises(ValueError, match="fp16 is for CUDA"):  # asked for by flag, it is an error
        engine_options(entry(cfg), Settings(device="cpu", precision="fp16"))


def test_precision_threads_and_token_budget_automatic_then_config_then_flags() -> None:
    cfg = default_config("m", 2, 2, batch_texts=64)
    auto = engine_options(entry(cfg), Settings())
    assert (auto.precision, (auto.instances, auto.threads)) == (resolve_precision("auto", "cpu"), engine_layout("cpu"))
    assert token_budget(entry(cfg), Settings(), 2, 128, 8).max_tokens == 32 * AUTO_TOKENS_PER_GROUP  # 32 groups
    assert token_budget(entry(cfg), Settings(), 2, 128, 8, device="cuda") is None  # a GPU pass is bound by its launches, not its tokens
    # config.pbtxt parameters
    cfg.parameters["precision"].string_value = "fp32"
    cfg.parameters["INTRA_OP_THREAD_COUNT"].string_value = "3"
    cfg.parameters["max_batch_tokens"].string_value = "1024"
    opts = engine_options(entry(cfg), Settings())
    assert (opts.precision, opts.threads) == ("fp32", 3)
    budget = token_budget(entry(cfg), Settings(), 2, 128, 8)
    assert (budget.max_tokens, budget.group, budget.max_length, budget.pad_multiple) == (1024, 2, 128, 8)
    assert token_budget(entry(cfg), Settings(), 2, 128, 8, device="cuda").max_tokens == 1024  # as configured, on a GPU too
    # flags win
    flags = Settings(precision="bf16", threads=5, max_batch_tokens=0)
    opts = engine_options(entry(cfg), flags)
    assert (opts.precision, opts.threads) == ("bf16", 5)
    assert token_budget(entry(cfg), flags, 2, 128, 8) is None  # 0: fixed batches
    cfg.parameters["max_batch_tokens"].string_value = "lots"
    with pytest.raises(RepositoryError, match="max_batch_tokens"):
        token_budget(entry(cfg), Settings(), 2, 128, 8)


def test_cuda_graphs_automatic_then_config_then_flag() -> None:
    cfg = default_config("m", 2, 2, batch_texts=64)
    auto = engine_options(entry(cfg), Settings())
    assert auto.cuda_graphs is None and auto.max_texts == cfg.max_batch_size  # None: where the model allows
    cfg.optimization.cuda.graphs = False  # Triton's optimization { cuda { graphs: false } }
    assert engine_options(entry(cfg), Settings()).cuda_graphs is False
    assert engine_options(entry(cfg), Settings(cuda_graphs=True)).cuda_graphs is True


@pytest.mark.parametrize(
    ("device", "instances", "threads", "cores", "layout"),
    [
        ("cpu", 0, 0, 1, (1, 1)),
        ("cpu", 0, 0, 2, (2, 1)),  # one single-thread instance per core
        ("cpu", 0, 0, AUTO_CPU_INSTANCES, (AUTO_CPU_INSTANCES, 1)),
        ("cpu", 0, 0, 4 * AUTO_CPU_INSTANCES, (AUTO_CPU_INSTANCES, 4)),  # past the cap: more threads each
        ("cpu", 0, 2, 8, (4, 2)),  # threads given: as many instances as fill the cores
        ("cpu", 0, 4, 2, (1, 4)),
        ("cpu", 1, 0, 8, (1, 8)),  # instances given: the cores split over them
        ("cpu", 3, 0, 2, (3, 1)),
        ("cpu", 2, 3, 2, (2, 3)),  # both given: as given
        ("cuda", 0, 0, 8, (1, 8)),  # a device runs one pass at a time
        ("cuda:1", 2, 0, 8, (2, 4)),
    ],
)
def test_engine_layout(device: str, instances: int, threads: int, cores: int, layout: tuple[int, int]) -> None:
    assert engine_layout(device, instances, threads, cores) == layout


def test_engine_layout_from_instance_group_parameters_and_flags() -> None:
    cfg = default_config("m", 2, 2)  # instance_group without a count: automatic
    assert not cfg.instance_group[0].count
    assert (engine_options(entry(cfg), Settings()).instances, engine_options(entry(cfg), Settings()).threads) == engine_layout("cpu")
    cfg.instance_group[0].count = 3  # an explicit count is what Triton serves
    opts = engine_options(entry(cfg), Settings())
    assert (opts.instances, opts.threads) == engine_layout("cpu", 3)
    cfg.parameters["INTRA_OP_THREAD_COUNT"].string_value = "2"
    opts = engine_options(entry(cfg), Settings())
    assert (opts.instances, opts.threads) == (3, 2)
    opts = engine_options(entry(cfg), Settings(instances=1, threads=1))  # flags win
    assert (opts.instances, opts.threads) == (1, 1)
    cfg.instance_group[0].count = 0
    opts = engine_options(entry(cfg), Settings())  # threads alone: instances to fill the cores
    assert (opts.instances, opts.threads) == engine_layout("cpu", 0, 2)
    del cfg.parameters["INTRA_OP_THREAD_COUNT"]
    assert engine_options(entry(cfg), Settings(engine="echo")).instances == 1  # computes nothing: one instance


def test_pass_fill_automatic_then_config_then_flag() -> None:
    cfg = default_config("m", 2, 2)
    assert pass_fill_seconds(entry(cfg), Settings()) == AUTO_PASS_FILL_US / 1e6
    cfg.parameters["pass_fill_microseconds"].string_value = "2500"
    assert pass_fill_seconds(entry(cfg), Settings()) == 0.0025
    assert pass_fill_seconds(entry(cfg), Settings(pass_fill_ms=0)) == 0  # the flag wins; 0: off
    cfg.parameters["pass_fill_microseconds"].string_value = "soon"
    with pytest.raises(RepositoryError, match="pass_fill_microseconds"):
        pass_fill_seconds(entry(cfg), Settings())


def test_max_texts_is_max_batch_size_in_whole_groups() -> None:
    cfg = default_config("m", 5, 2, batch_texts=64)
    cfg.max_batch_size = 64
    assert max_texts(entry(cfg), 5) == 60


def test_serve_flags_reach_the_settings() -> None:
    parser, _ = build_parser()
    a = parser.parse_args(["serve", "--precision", "bf16", "--instances", "3", "--threads", "4", "--max-batch-tokens", "2048", "--pass-fill-ms", "2.5"])
    settings = settings_from_args(a)
    assert (settings.precision, settings.instances, settings.threads, settings.max_batch_tokens, settings.pass_fill_ms) == ("bf16", 3, 4, 2048, 2.5)
    unset = settings_from_args(parser.parse_args(["serve"]))
    assert (unset.precision, unset.instances, unset.threads, unset.max_batch_tokens, unset.pass_fill_ms) == ("", 0, 0, None, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--precision", "int4"])


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
