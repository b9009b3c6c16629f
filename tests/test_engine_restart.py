"""The engine process dies under load: every request it held is answered 503 (HTTP) or
UNAVAILABLE (gRPC) at once, the frontends are not ready and refuse new work with 503 while it
is gone, the supervisor starts it again, and then the server is ready and exact again.

The real server (two frontend processes) on loopback; the engine is killed with SIGKILL while
requests sit in its queue (a model whose batches wait 3 s)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio
from helpers import make_tiny_repository
from serving import Echo, TextSource, queue_depth, serving, text_array
from tritonclient.utils import InferenceServerException

MODEL = "tiny-slow"
ENGINE_MODULE = "muxserve.serving.engine_service"
REQUESTS = 24
RECOVERY_TIMEOUT_S = 180  # a bound against hanging, not a performance claim


def engine_pid(supervisor: int) -> int:
    """The engine process among the supervisor's children (by its command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == supervisor and ENGINE_MODULE.encode() in cmdline:
            found.append(int(entry.name))
    assert len(found) == 1, f"engine processes of {supervisor}: {found}"
    return found[0]


def queued_texts(http: httpx.Client) -> float:
    return queue_depth(http.get("/metrics").text, MODEL)


async def until_ready(http: httpx.AsyncClient) -> None:
    while (await http.get("/v2/health/ready")).status_code != 200:
        await asyncio.sleep(0.1)


def body(texts: list[str]) -> dict:
    return {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(texts), 1], "data": texts}]}


@pytest.mark.slow
async def test_engine_killed_under_load_then_restarted(tmp_path):
    repository = make_tiny_repository(tmp_path / "repo", {MODEL: 2}, engine="echo", max_batch_size=256, batch_texts=4096, max_queue_delay_us=3_000_000, max_queue_size=4096)
    echo = Echo(repository, MODEL)
    source = TextSource(seed=11)
    with serving(repository, tmp_path / "server.log", "--workers", "2") as server:
        base = f"http://{server.http_url}"
        http = httpx.AsyncClient(base_url=base, timeout=RECOVERY_TIMEOUT_S)
        grpc = grpcaio.InferenceServerClient(server.grpc_url)
        sync = httpx.Client(base_url=base, timeout=30)

        async def over_http(texts: list[str]) -> int:
            return (await http.post(f"/v2/models/{MODEL}/infer", json=body(texts))).status_code

        async def over_grpc(texts: list[str]) -> str:
            tensor = grpcaio.InferInput("TEXT", [len(texts), 1], "BYTES")
            tensor.set_data_from_numpy(text_array(texts))
            try:
                await grpc.infer(MODEL, [tensor])
            except InferenceServerException as exc:
                return exc.status()
            return "OK"

        try:
            first = engine_pid(server.proc.pid)
            tasks = [asyncio.create_task((over_http if i % 2 else over_grpc)(source(1))) for i in range(REQUESTS)]
            while await asyncio.to_thread(queued_texts, sync) < REQUESTS:  # all of them wait in the engine's queue
                assert not any(t.done() for t in tasks), [t.result() for t in tasks if t.done()]
                await asyncio.sleep(0.02)
            os.kill(first, signal.SIGKILL)
            statuses = await asyncio.wait_for(asyncio.gather(*tasks), RECOVERY_TIMEOUT_S)
            assert sorted(map(str, statuses)) == sorted(["503"] * (REQUESTS // 2) + ["StatusCode.UNAVAILABLE"] * (REQUESTS // 2))
            # the gap: not ready, new requests refused at once
            assert (await http.get("/v2/health/ready")).status_code == 503
            refused = await http.post(f"/v2/models/{MODEL}/infer", json=body(["during the gap"]))
            assert refused.status_code == 503 and "engine" in refused.json()["error"]
            # back: ready, a new engine process, exact answers, fresh counts
            await asyncio.wait_for(until_ready(http), RECOVERY_TIMEOUT_S)
            assert engine_pid(server.proc.pid) != first
            texts = source(3)
            reply = await http.post(f"/v2/models/{MODEL}/infer", json=body(texts))
            assert reply.status_code == 200, reply.text
            np.testing.assert_array_equal(np.array(reply.json()["outputs"][0]["data"], dtype=np.float32).reshape(3, -1), echo.rows(texts))
            stats = (await http.get(f"/v2/models/{MODEL}/stats")).json()["model_stats"][0]
            assert stats["inference_count"] == 3
        finally:
            await http.aclose()
            await grpc.close()
            sync.close()
    assert "engine process" in server.log() and "starting it again" in server.log()


def test_frontends_listen_once_the_engine_has_answered_them(tmp_path):
    """Eight frontends share the ports, and none listens before the engine has loaded the models
    and answered it: from the first answer that says the server is ready, every connection
    (each may reach another frontend) finds the model ready. A frontend that listened before
    the engine had answered it said "not ready" right after another said ready (seen with 8
    frontends on a 16-core host)."""
    import subprocess
    import sys

    from muxserve.launch import free_port

    # a dozen models: the engine answers a second or more after the frontends are up
    make_tiny_repository(tmp_path / "repo", {f"tiny-{i}": 2 for i in range(12)})
    port = free_port()
    log_path = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "muxserve", "serve", "--model-repository", str(tmp_path / "repo"), "--host", "127.0.0.1", "--http-port", str(port), "--grpc-port", "0", "--workers", "8", "--no-shadow"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:  # the first answer that says ready (each request on a new connection)
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        statuses = [httpx.get(f"{url}/v2/models/tiny-11/ready", timeout=5).status_code for _ in range(40)]
        assert statuses == [200] * 40, log_path.read_text()[-3000:]
        # and none listened before the engine was up (its models loaded)
        lines = log_path.read_text().splitlines()
        engine_up = next(i for i, line in enumerate(lines) if "engine process" in line and line.endswith("ready"))
        listening = [i for i, line in enumerate(lines) if "frontend listening" in line]
        assert len(listening) == 8 and min(listening) > engine_up, "\n".join(lines[-40:])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()[-3000:]
