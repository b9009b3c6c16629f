"""Model control, Triton's repository extension, through stock tritonclient (HTTP and gRPC).

explicit mode: ``--load-model`` at start, load/unload requests, a failed reload that leaves the
serving version serving, a reload while requests keep coming (none fails; answers come from both
versions), and every frontend process seeing a load and an unload. poll mode: a new version
folder is picked up by itself, and load/unload requests are refused.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import make_tiny_repository
from serving import serving
from tritonclient.utils import InferenceServerException

CONDITION_TIMEOUT_S = 120  # a generous bound on waiting for a condition, not a timing assertion


def infer(client: httpclient.InferenceServerClient, model: str, texts: list[str]) -> httpclient.InferResult:
    tensor = httpclient.InferInput("TEXT", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object))
    return client.infer(model, [tensor])


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + CONDITION_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def add_version(model_dir: Path, version: int) -> None:
    """A new version folder (a copy of version 1), moved in whole so a scan never sees half of it."""
    staging = model_dir.parent / f".staging-{model_dir.name}-{version}"
    shutil.copytree(model_dir / "1", staging)
    staging.rename(model_dir / str(version))


def index(client: httpclient.InferenceServerClient) -> dict[tuple[str, str], dict]:
    return {(row["name"], row.get("version", "")): row for row in client.get_model_repository_index()}


def test_explicit_mode_loads_and_unloads_over_http_and_grpc(tmp_path: Path) -> None:
    repo = make_tiny_repository(tmp_path / "repo", {"first": 2, "second": 1}, max_batch_size=8)
    with serving(repo, tmp_path / "server.log", "--model-control-mode", "explicit", "--load-model", "first") as server:
        http = httpclient.InferenceServerClient(server.http_url)
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        assert http.is_model_ready("first") and not http.is_model_ready("second")
        assert index(http)[("second", "")] == {"name": "second"}  # in the repository, not loaded

        http.load_model("second")
        assert http.is_model_ready("second") and grpc.is_model_ready("second")
        assert infer(http, "second", ["a fine film"]).get_response()["model_version"] == "1"

        grpc.unload_model("first")
        assert not http.is_model_ready("first")
        assert index(http)[("first", "1")]["state"] == "UNAVAILABLE" and index(http)[("first", "1")]["reason"] == "unloaded"
        with pytest.raises(InferenceServerException, match="not ready"):
            infer(http, "first", ["a fine film"])
        grpc.load_model("first")
        assert grpc.is_model_ready("first") and infer(http, "first", ["a fine film", "a dull one"]).as_numpy("LABEL").shape == (2, 1)

        with pytest.raises(InferenceServerException, match="no such model"):
            http.load_model("missing")
        with pytest.raises(InferenceServerException, match="no such model"):
            grpc.load_model("missing")
        with pytest.raises(InferenceServerException, match="not supported"):
            http.load_model("second", config='{"max_batch_size": 4}')
        with pytest.raises(InferenceServerException, match="not loaded"):
            grpc.unload_model("missing")

        # a reload that fails leaves the serving version serving
        staging = tmp_path / "broken"
        shutil.copytree(repo / "second" / "1", staging)
        (staging / "model.safetensors").write_bytes(b"not a safetensors file")
        staging.rename(repo / "second" / "2")
        with pytest.raises(InferenceServerException, match="failed to load 'second' version 2"):
            http.load_model("second")
        assert infer(http, "second", ["still served"]).get_response()["model_version"] == "1"
        assert [row["version"] for row in http.get_model_repository_index() if row["name"] == "second"] == ["1"]
        assert http.is_server_ready()


def test_reload_under_load_loses_no_request(tmp_path: Path) -> None:
    """Callers keep sending while version 2 replaces version 1: every request is answered, first
    by version 1, then by version 2 (those already queued on version 1 at the swap by version 1)."""
    repo = make_tiny_repository(tmp_path / "repo", {"m": 2, "other": 1}, engine="echo", max_batch_size=8, max_queue_delay_us=20_000)
    with serving(repo, tmp_path / "server.log", "--model-control-mode", "explicit", "--load-model", "*") as server:
        assert httpclient.InferenceServerClient(server.http_url).is_model_ready("other")  # '*': every model
        stop = threading.Event()
        versions: Counter[str] = Counter()
        failures: list[str] = []
        lock = threading.Lock()

        def caller() -> None:
            client = httpclient.InferenceServerClient(server.http_url)
            while not stop.is_set():
                try:
                    version = infer(client, "m", ["one text", "and another"]).get_response()["model_version"]
                except InferenceServerException as exc:
                    with lock:
                        failures.append(str(exc))
                    continue
                with lock:
                    versions[version] += 1

        threads = [threading.Thread(target=caller) for _ in range(6)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: versions["1"] >= 50, "answers from version 1")
            add_version(repo / "m", 2)
            httpclient.InferenceServerClient(server.http_url).load_model("m")
            wait_until(lambda: versions["2"] >= 50, "answers from version 2")
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert failures == []
        assert set(versions) == {"1", "2"}
        rows = index(httpclient.InferenceServerClient(server.http_url))
        assert rows[("m", "2")]["state"] == "READY" and ("m", "1") not in rows  # version_policy latest 1


def test_poll_mode_picks_up_a_new_version_and_refuses_control_requests(tmp_path: Path) -> None:
    repo = make_tiny_repository(tmp_path / "repo", {"m": 2}, max_batch_size=8)
    with serving(repo, tmp_path / "server.log", "--model-control-mode", "poll", "--repository-poll-secs", "0.2") as server:
        http = httpclient.InferenceServerClient(server.http_url)
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        assert infer(http, "m", ["a text"]).get_response()["model_version"] == "1"
        add_version(repo / "m", 2)
        wait_until(lambda: http.is_model_ready("m", "2"), "version 2 to load")
        assert infer(http, "m", ["a text"]).get_response()["model_version"] == "2"
        wait_until(lambda: ("m", "1") not in index(http), "version 1 to leave")
        for client in (http, grpc):
            with pytest.raises(InferenceServerException, match="model control is disabled"):
                client.load_model("m")
            with pytest.raises(InferenceServerException, match="model control is disabled"):
                client.unload_model("m")
        # a folder that leaves the repository is unloaded
        shutil.rmtree(repo / "m")
        wait_until(lambda: not http.is_model_ready("m"), "the removed model to unload")


def test_every_frontend_sees_a_load_and_an_unload(tmp_path: Path) -> None:
    """With two frontend processes, a load or unload answered by one is seen by the other: each
    check below opens a new connection, which either frontend may accept."""
    repo = make_tiny_repository(tmp_path / "repo", {"m": 2, "other": 1}, engine="echo", max_batch_size=8)
    with serving(repo, tmp_path / "server.log", "--workers", "2", "--model-control-mode", "explicit", "--load-model", "other") as server:
        url = f"http://{server.http_url}/v2/models/m/ready"

        def ready_everywhere() -> set[int]:
            return {httpx.get(url, headers={"connection": "close"}).status_code for _ in range(40)}

        assert ready_everywhere() == {404}  # in the repository, not loaded: unknown to the data plane
        grpcclient.InferenceServerClient(server.grpc_url).load_model("m")
        assert ready_everywhere() == {200}
        httpclient.InferenceServerClient(server.http_url).unload_model("m")
        assert ready_everywhere() == {503}  # unloaded: listed, not ready
