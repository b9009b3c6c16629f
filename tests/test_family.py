"""Model families through the real server and stock tritonclient (HTTP and gRPC): the family
in the repository index, metadata, config and statistics; the per-request knobs
``max_num_instances`` and ``ensemble``; the ``num_instances`` response parameter; the
family's metrics.

Families of tiny models: ``fam`` and ``fam-count`` with a target queue delay so small that
any queued text is beyond N=1's capacity (so load makes them serve wide), ``fam-calm`` with
the default target (a lone request is served at N=1)."""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from helpers import ROOT, make_tiny_repository
from observability import scrape, value
from serving import Echo, TextSource, serving, text_array
from tritonclient.utils import InferenceServerException

from muxserve.model.packaging import family_config, write_config
from muxserve.serving.repository import parse_config

pytestmark = pytest.mark.slow

MEMBERS = {"fam-bert": 1, "fam-mux2": 2, "fam-mux5": 5}
ECHO2 = "fam-echo"  # echo engine, N=2: a text's row encodes its own token ids
ACCURACY = {"fam-bert": 0.9, "fam-mux2": 0.85, "fam-mux5": 0.8}
TEXTS = TextSource(seed=21)
PROTOCOLS = ["http", "grpc"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("family-repo")
    make_tiny_repository(root, MEMBERS, max_batch_size=16)
    make_tiny_repository(root, {ECHO2: 2}, engine="echo", max_batch_size=16)
    for name, target_ms in {"fam": 1e-6, "fam-count": 1e-6, "fam-calm": 500}.items():
        (root / name).mkdir()
        write_config(root / name / "config.pbtxt", family_config(name, list(MEMBERS), num_labels=2, max_batch_size=16, target_queue_delay_ms=target_ms, accuracy_record="dev_accuracy"))
    (root / "MODELS.json").write_text(json.dumps({name: {"dev_accuracy": acc} for name, acc in ACCURACY.items()}))
    return root


@pytest.fixture(scope="module")
def server(repository: Path):
    with serving(repository, repository.parent / "family-server.log") as proc:
        yield proc


def infer(server, protocol: str, model: str, texts: list[str], **parameters: object) -> tuple[np.ndarray, int]:
    """(LOGITS, the num_instances response parameter) through stock tritonclient."""
    module = grpcclient if protocol == "grpc" else httpclient
    client = module.InferenceServerClient(server.url(protocol))
    try:
        tensor = module.InferInput("TEXT", [len(texts), 1], "BYTES")
        tensor.set_data_from_numpy(text_array(texts))
        result = client.infer(model, [tensor], parameters=parameters or None)
        return result.as_numpy("LOGITS"), used_width(result, protocol)
    finally:
        client.close()


def used_width(result, protocol: str) -> int:
    if protocol == "grpc":
        return result.get_response().parameters["num_instances"].int64_param
    return result.get_response()["parameters"]["num_instances"]


async def load(server, protocol: str, model: str, requests: list[tuple[list[str], dict]]) -> list[tuple[np.ndarray, int]]:
    """All requests at once (asyncio tritonclient): (LOGITS, num_instances) of each."""
    module = grpcaio if protocol == "grpc" else httpaio
    client = module.InferenceServerClient(server.url(protocol))

    async def one(texts: list[str], parameters: dict) -> tuple[np.ndarray, int]:
        tensor = module.InferInput("TEXT", [len(texts), 1], "BYTES")
        tensor.set_data_from_numpy(text_array(texts))
        result = await client.infer(model, [tensor], parameters=parameters or None)
        return result.as_numpy("LOGITS"), used_width(result, protocol)

    try:
        return await asyncio.gather(*(one(texts, params) for texts, params in requests))
    finally:
        await client.close()


# ---------------------------------------------------------------------------- the family as a model


def test_bundled_family_config_is_the_packaging_helpers() -> None:
    expected = family_config("sst2", ["sst2-bert", "sst2-mux2", "sst2-mux5"], num_labels=2, accuracy_record="sst2_dev_accuracy")
    assert parse_config(ROOT / "model_repository" / "sst2" / "config.pbtxt") == expected


def test_family_in_index_metadata_config_and_statistics(server) -> None:
    http = httpclient.InferenceServerClient(server.http_url)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        index = {m["name"]: m for m in http.get_model_repository_index()}
        assert index["fam"]["state"] == "READY"
        assert {m.name for m in grpc.get_model_repository_index().models} >= {"fam", *MEMBERS}
        assert http.is_model_ready("fam") and grpc.is_model_ready("fam")
        meta = http.get_model_metadata("fam")
        assert meta["platform"] == "ensemble"
        assert [i["name"] for i in meta["inputs"]] == ["TEXT"] and {o["name"] for o in meta["outputs"]} == {"LOGITS", "LABEL"}
        config = grpc.get_model_config("fam").config
        assert [s.model_name for s in config.ensemble_scheduling.step] == list(MEMBERS)
        assert http.get_model_config("fam")["parameters"]["family_policy"]["string_value"] == "load_adaptive"
        infer(server, "http", "fam", TEXTS(3))
        (entry,) = http.get_inference_statistics("fam")["model_stats"]
        assert entry["inference_count"] >= 3 and entry["execution_count"] >= 1
        assert grpc.get_inference_statistics("fam").model_stats[0].inference_count >= 3
    finally:
        http.close()
        grpc.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_response_says_which_n_served_it(server, protocol: str) -> None:
    for model, n in {**MEMBERS, ECHO2: 2}.items():
        _, used = infer(server, protocol, model, TEXTS(2))
        assert used == n
    _, used = infer(server, protocol, "fam-calm", TEXTS(2))
    assert used == 1  # one request alone: far below N=1's capacity


# ---------------------------------------------------------------------------- max_num_instances


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_max_num_instances_1_under_load_is_never_served_wider(server, protocol: str) -> None:
    """Many requests at once, every third capped at N=1: the capped ones all come back at N=1
    with the N=1 member's own logits; the load serves the others wider."""
    requests = [(TEXTS(1 + i % 4), {"max_num_instances": 1} if i % 3 == 0 else {}) for i in range(60)]
    results = asyncio.run(load(server, protocol, "fam", requests))
    capped = [(texts, logits, used) for (texts, params), (logits, used) in zip(requests, results, strict=True) if params]
    assert {used for _, _, used in capped} == {1}
    assert max(used for (_, params), (_, used) in zip(requests, results, strict=True) if not params) > 1
    for texts, logits, _ in capped:
        alone, _ = infer(server, protocol, "fam-bert", texts)
        np.testing.assert_allclose(logits, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_max_num_instances_between_members_takes_the_narrower(server, protocol: str) -> None:
    results = asyncio.run(load(server, protocol, "fam", [(TEXTS(4), {"max_num_instances": 3})] * 20))
    assert {used for _, used in results} <= {1, 2} and 2 in {used for _, used in results}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("parameters", [{"max_num_instances": -1}, {"max_num_instances": "one"}, {"ensemble": "yes"}])
def test_bad_knobs_are_refused(server, protocol: str, parameters: dict) -> None:
    with pytest.raises(InferenceServerException) as err:
        infer(server, protocol, "fam", TEXTS(1), **parameters)
    assert "max_num_instances" in str(err.value) or "ensemble" in str(err.value)
    _, used = infer(server, protocol, "fam-calm", TEXTS(1))  # still serving
    assert used == 1


def test_max_num_instances_below_a_models_n_is_refused(server) -> None:
    with pytest.raises(InferenceServerException, match="N=5"):
        infer(server, "http", "fam-mux5", TEXTS(1), max_num_instances=2)
    _, used = infer(server, "http", "fam-mux5", TEXTS(1), max_num_instances=5)
    assert used == 5


# ---------------------------------------------------------------------------- ensemble


def batch_sizes(server, model: str) -> Counter:
    (entry,) = httpx.get(f"http://{server.http_url}/v2/models/{model}/stats").json()["model_stats"]
    return Counter({int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in entry["batch_stats"]})


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_ensemble_runs_n_copies_of_each_text_and_answers_its_own(server, repository: Path, protocol: str) -> None:
    """On the echo model (each row encodes its own ids) the mean of a text's copies is its own
    row: copies are never mixed up; the pass computed N rows per text."""
    texts = TEXTS(3)
    before = batch_sizes(server, ECHO2)
    logits, used = infer(server, protocol, ECHO2, texts, ensemble=True)
    assert used == 2
    np.testing.assert_array_equal(logits, Echo(repository, ECHO2).rows(texts))
    assert batch_sizes(server, ECHO2) - before == Counter({6: 1})  # 3 texts, 2 copies each


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_ensemble_changes_the_prediction_not_its_shape(server, protocol: str) -> None:
    texts = TEXTS(4)
    plain, _ = infer(server, protocol, "fam-mux5", texts)
    ensembled, used = infer(server, protocol, "fam-mux5", texts, ensemble=True)
    assert used == 5 and ensembled.shape == plain.shape == (4, 2)
    assert not np.allclose(ensembled, plain)
    capped, used = infer(server, protocol, "fam", texts, ensemble=True, max_num_instances=1)
    assert used == 1 and capped.shape == (4, 2)  # at N=1 an ensemble is the plain pass


# ---------------------------------------------------------------------------- /v1/classify


def test_classify_takes_the_knobs_and_says_which_n(server) -> None:
    url = f"http://{server.http_url}/v1/classify"
    capped = httpx.post(url, json={"model": "fam", "inputs": TEXTS(3), "parameters": {"max_num_instances": 1, "ensemble": True}})
    assert capped.status_code == 200, capped.text
    assert [r["num_instances"] for r in capped.json()] == [1, 1, 1]
    assert {r["label"] for r in capped.json()} <= {"negative", "positive"}
    plain = httpx.post(url, json={"model": "fam-mux2", "inputs": TEXTS(2)}).json()
    assert [r["num_instances"] for r in plain] == [2, 2]
    bad = httpx.post(url, json={"model": "fam", "inputs": TEXTS(1), "parameters": {"max_num_instances": 0.5}})
    assert bad.status_code == 400 and "max_num_instances" in bad.json()["error"]


# ---------------------------------------------------------------------------- metrics


def test_family_metrics_count_texts_by_n_and_weigh_accuracy(server) -> None:
    requests = [(TEXTS(2), {"max_num_instances": 1} if i % 2 else {}) for i in range(30)]
    results = asyncio.run(load(server, "grpc", "fam-count", requests))
    served = Counter()
    for (texts, _), (_, used) in zip(requests, results, strict=True):
        served[used] += len(texts)
    metrics = scrape(server.http_url)
    for n in MEMBERS.values():
        assert value(metrics, "muxserve_family_texts_total", family="fam-count", num_instances=str(n)) == served[n]
    by_n = {n: ACCURACY[name] for name, n in MEMBERS.items()}
    expected = sum(by_n[n] * k for n, k in served.items()) / sum(served.values())
    assert math.isclose(value(metrics, "muxserve_family_expected_accuracy", family="fam-count"), expected, rel_tol=1e-9)
    assert value(metrics, "muxserve_family_num_instances", family="fam-count") == 5
    assert value(metrics, "muxserve_family_member_capacity_texts_per_second", family="fam-count", num_instances="5") > 0


# ---------------------------------------------------------------------------- model control


def test_a_family_follows_its_members_under_model_control(repository: Path, tmp_path: Path) -> None:
    """Explicit mode: loading the family loads its members; unloading a member takes the
    family out of service (503); loading the family again brings both back."""
    with serving(repository, tmp_path / "control.log", "--model-control-mode", "explicit", "--load-model", "fam-calm") as server:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            assert all(client.is_model_ready(m) for m in ["fam-calm", *MEMBERS])
            client.unload_model("fam-mux2")
            index = {m["name"]: m for m in client.get_model_repository_index()}
            assert index["fam-calm"]["state"] == "UNAVAILABLE" and index["fam-mux2"]["state"] == "UNAVAILABLE"
            with pytest.raises(InferenceServerException, match="503|not ready"):
                infer(server, "http", "fam-calm", TEXTS(1))
            client.load_model("fam-calm")
            assert client.is_model_ready("fam-mux2")
            results = asyncio.run(load(server, "http", "fam-calm", [(TEXTS(2), {"max_num_instances": 2})] * 8))
            assert {used for _, used in results} <= {1, 2}
        finally:
            client.close()

