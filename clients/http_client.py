"""Classify texts with stock tritonclient over HTTP (KServe v2), JSON or binary tensors.

    python clients/http_client.py --model sst2-mux5 "a gripping , funny film" "dull and lifeless"
"""

from __future__ import annotations

import argparse

import numpy as np
import tritonclient.http as httpclient


def classify(client: httpclient.InferenceServerClient, model: str, texts: list[str], binary: bool = True) -> list[tuple[str, list[float]]]:
    text = httpclient.InferInput("TEXT", [len(texts), 1], "BYTES")
    text.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object), binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("LABEL", binary_data=binary), httpclient.InferRequestedOutput("LOGITS", binary_data=binary)]
    result = client.infer(model, [text], outputs=outputs)
    # binary BYTES tensors come back as bytes, JSON ones as str
    labels = [row[0].decode() if isinstance(row[0], bytes) else row[0] for row in result.as_numpy("LABEL")]
    return list(zip(labels, result.as_numpy("LOGITS").tolist(), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts", nargs="+")
    parser.add_argument("--url", default="localhost:8000")
    parser.add_argument("--model", default="sst2-mux2")
    parser.add_argument("--json", action="store_true", help="JSON tensors instead of binary")
    a = parser.parse_args()
    client = httpclient.InferenceServerClient(a.url)
    if not client.is_model_ready(a.model):
        raise SystemExit(f"model {a.model} is not ready on {a.url}")
    for text, (label, logits) in zip(a.texts, classify(client, a.model, a.texts, not a.json), strict=True):
        print(f"{label:>10}  {logits}  {text}")


if __name__ == "__main__":
    main()
