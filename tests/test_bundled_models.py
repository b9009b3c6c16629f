"""The bundled models in model_repository/, served by the real server and driven by stock
tritonclient over HTTP and gRPC; their size budget; their accuracy on SST-2 dev."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format
from helpers import ROOT, SST2_DEV
from serving import serving
from tritonclient.grpc import model_config_pb2 as mc

REPOSITORY = ROOT / "model_repository"
BUNDLED = sorted(p.parent.name for p in REPOSITORY.glob("*/config.pbtxt"))
CARD = REPOSITORY / "MODELS.json"

pytestmark = pytest.mark.skipif(not BUNDLED, reason="no bundled models in model_repository/")

TEXTS = ["a gripping , funny and deeply moving film .", "dull , lifeless and far too long .", "one of the best movies of the year", "an awful , boring mess"]


def test_repository_fits_the_budget() -> None:
    total = sum(f.stat().st_size for f in REPOSITORY.rglob("*") if f.is_file())
    assert total <= 150 * 1024 * 1024, f"model_repository is {total / 2**20:.1f} MB"
    assert not list(REPOSITORY.rglob("*.pt")), "TorchScript exports are generated at deploy time, not committed"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with serving(REPOSITORY, tmp_path_factory.mktemp("bundled") / "server.log", "--no-shadow") as proc:
        yield proc


@pytest.mark.parametrize("model", BUNDLED)
def test_http_and_grpc_serve_each_bundled_model(server, model: str) -> None:
    http = httpclient.InferenceServerClient(server.http_url)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    assert http.is_model_ready(model) and grpc.is_model_ready(model)
    cfg = json_format.ParseDict(http.get_model_config(model), mc.ModelConfig())
    assert cfg.name == model and grpc.get_model_config(model).config.name == model
    meta = http.get_model_metadata(model)
    assert [o["name"] for o in meta["outputs"]] == ["LOGITS", "LABEL"]

    data = np.array([[t.encode()] for t in TEXTS], dtype=object)
    h_in = httpclient.InferInput("TEXT", [len(TEXTS), 1], "BYTES")
    h_in.set_data_from_numpy(data, binary_data=True)
    h = http.infer(model, [h_in])
    g_in = grpcclient.InferInput("TEXT", [len(TEXTS), 1], "BYTES")
    g_in.set_data_from_numpy(data)
    g = grpc.infer(model, [g_in])
    for result in (h, g):
        logits = result.as_numpy("LOGITS")
        assert logits.shape == (len(TEXTS), 2) and logits.dtype == np.float32
        labels = [x[0].decode() for x in result.as_numpy("LABEL")]
        assert labels == [["negative", "positive"][i] for i in logits.argmax(1)]
        if model == "sst2-bert":  # the baseline gets the obvious ones right (mux accuracy: the card)
            assert labels == ["positive", "negative", "positive", "negative"], labels
    np.testing.assert_allclose(h.as_numpy("LOGITS"), g.as_numpy("LOGITS"), atol=1e-5)


@pytest.mark.skipif(not SST2_DEV.exists() or not CARD.exists(), reason="needs ../shared/data and model_repository/MODELS.json")
@pytest.mark.parametrize("model", BUNDLED)
def test_model_card_accuracy_is_what_eval_measures(model: str) -> None:
    """`muxserve eval` on SST-2 dev reproduces the accuracy the model card (and README) states."""
    card = json.loads(CARD.read_text())[model]
    out = subprocess.run([sys.executable, "-m", "muxserve", "eval", "--model-repository", str(REPOSITORY), "--model", model, "--data", str(SST2_DEV)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 872
    assert result["accuracy"] == pytest.approx(card["sst2_dev_accuracy"], abs=0.002)


def test_card_lists_every_bundled_model() -> None:
    if not CARD.exists():
        pytest.skip("no model card")
    assert sorted(json.loads(CARD.read_text())) == BUNDLED
    assert Path(REPOSITORY / "sst2-bert").exists()
