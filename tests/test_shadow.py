"""Shadow sampling at rate 1.0: every SST-2 dev sentence that ``sst2-mux2`` serves is also run
through its baseline ``sst2-bert``, and the agreement the server exports matches the same
agreement computed offline within 1 point.

Offline: the baseline's labels come from the model loaded from the repository (a plain BERT's
label of a text does not depend on its batch); the mux labels are the server's own LABEL
outputs (a mux model's label depends on which texts share its group).

Two setups: tiny random models (calibrated so that both split the sentences between the two
labels, else agreement is trivially 0 or 1), and the trained ``sst2-mux2`` of
``model_repository/`` when it is there.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from google.protobuf import text_format
from helpers import ROOT, SST2_DEV, start_server
from observability import make_repository, scrape, value
from tritonclient.grpc import model_config_pb2 as mc

from muxserve.model.packaging import write_config
from muxserve.model.tokenizer import TextTokenizer
from muxserve.model.weights import TOKENIZER_FILE, load_model

pytestmark = pytest.mark.skipif(not SST2_DEV.exists(), reason=f"{SST2_DEV} not found (../shared/data)")

MUX, BASELINE = "sst2-mux2", "sst2-bert"
BUNDLED = ROOT / "model_repository"
TEXTS_PER_REQUEST = 8


def dev_sentences() -> list[str]:
    rows = [line.split("\t") for line in SST2_DEV.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    return [r[0] for r in rows]


def tiny_repository(root: Path, texts: list[str]) -> Path:
    return make_repository(root, {BASELINE: 1, MUX: 2}, configs={MUX: {"baseline": BASELINE, "shadow_sample_rate": 1.0}}, balance_on=texts)


def bundled_repository(root: Path) -> Path:
    """The trained sst2-mux2 and its baseline, linked into a repository with shadow_sample_rate 1."""
    cfg_path = BUNDLED / MUX / "config.pbtxt"
    if not cfg_path.exists():
        pytest.skip(f"{cfg_path} not found (train and package sst2-mux2 first)")
    config = text_format.Parse(cfg_path.read_text(), mc.ModelConfig())
    baseline = config.parameters["baseline"].string_value if "baseline" in config.parameters else ""
    if not baseline or not (BUNDLED / baseline / "config.pbtxt").exists():
        pytest.skip(f"{MUX} names no packaged baseline")
    for name in (MUX, baseline):
        (root / name).mkdir(parents=True)
        for version in (BUNDLED / name).iterdir():
            if version.is_dir() and version.name.isdigit():
                (root / name / version.name).symlink_to(version.resolve(), target_is_directory=True)
        (root / name / "config.pbtxt").write_text((BUNDLED / name / "config.pbtxt").read_text())
    config.parameters["shadow_sample_rate"].string_value = "1.0"
    write_config(root / MUX / "config.pbtxt", config)
    return root


def baseline_labels(model_dir: Path, texts: list[str], batch: int = 64) -> list[str]:
    model = load_model(model_dir)
    tokenizer = TextTokenizer(model_dir / TOKENIZER_FILE, model.config.max_seq_length)
    labels: list[str] = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            logits = model(*tokenizer(texts[i : i + batch]))
            labels += [model.config.labels[int(k)] for k in logits.argmax(-1)]
    return labels


def latest_version(model_root: Path) -> Path:
    return max((p for p in model_root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["tiny", "bundled"])
def test_shadow_agreement_matches_offline(tmp_path, setup):
    texts = dev_sentences()
    repo = tiny_repository(tmp_path / "repo", texts) if setup == "tiny" else bundled_repository(tmp_path / "repo")
    baseline = text_format.Parse((repo / MUX / "config.pbtxt").read_text(), mc.ModelConfig()).parameters["baseline"].string_value
    # fp32, as the offline baseline below computes: the comparison is of the sampling, not of precisions
    server = start_server(repo, tmp_path / "server.log", "--threads", "1", "--precision", "fp32", grpc=False)
    try:
        url = f"http://{server.http_url}"
        chunks = [texts[i : i + TEXTS_PER_REQUEST] for i in range(0, len(texts), TEXTS_PER_REQUEST)]

        def classify(chunk: list[str]) -> list[str]:
            r = httpx.post(f"{url}/v1/classify", json={"model": MUX, "inputs": chunk}, timeout=120)
            assert r.status_code == 200, r.text
            return [item["label"] for item in r.json()]

        with ThreadPoolExecutor(4) as pool:  # concurrent callers: texts of different requests share groups
            mux_labels = [label for labels in pool.map(classify, chunks) for label in labels]
        assert len(mux_labels) == len(texts)

        labels = {"model": MUX, "baseline": baseline}
        deadline = time.monotonic() + 300
        while (compared := value(samples := scrape(server.http_url), "muxserve_shadow_texts_total", **labels)) < len(texts):
            assert value(samples, "muxserve_shadow_dropped_total", **labels) == 0, "shadow texts dropped"
            assert time.monotonic() < deadline, f"only {compared} of {len(texts)} texts compared:\n{server.log()[-3000:]}"
            time.sleep(0.2)
        assert compared == len(texts)
        agreements = value(samples, "muxserve_shadow_agreements_total", **labels)
        served = value(samples, "muxserve_shadow_agreement_ratio", **labels)
        assert served == pytest.approx(agreements / len(texts), abs=1e-12)
    finally:
        server.stop()

    offline_baseline = baseline_labels(latest_version(repo / baseline), texts)
    agree = np.mean([m == b for m, b in zip(mux_labels, offline_baseline, strict=True)])
    print(f"\n{setup}: {len(texts)} SST-2 dev sentences, agreement served {served:.4f} offline {agree:.4f}; labels mux {dict(Counter(mux_labels))} baseline {dict(Counter(offline_baseline))}")
    if setup == "tiny":  # the calibration worked: the agreement is not trivially 0 or 1
        assert 0.05 < agree < 0.95
    assert abs(served - agree) <= 0.01, f"served agreement {served:.4f} vs offline {agree:.4f}"
