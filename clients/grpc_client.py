"""Classify texts with stock tritonclient over gRPC: one request, or a stream of requests.

    python clients/grpc_client.py --model sst2-mux5 "a gripping , funny film" "dull and lifeless"
    python clients/grpc_client.py --stream --model sst2-mux5 "one" "request" "per" "text"

Streaming sends every text as its own request on one bidirectional stream; the server fills
mux groups across them and answers each as soon as its forward pass is done.
"""

from __future__ import annotations

import argparse
import queue

import numpy as np
import tritonclient.grpc as grpcclient


def text_input(texts: list[str]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("TEXT", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
    return tensor


def classify(client: grpcclient.InferenceServerClient, model: str, texts: list[str]) -> list[str]:
    result = client.infer(model, [text_input(texts)], outputs=[grpcclient.InferRequestedOutput("LABEL")])
    return [row[0].decode() for row in result.as_numpy("LABEL")]


def classify_streaming(client: grpcclient.InferenceServerClient, model: str, texts: list[str]) -> list[str]:
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i, t in enumerate(texts):
            client.async_stream_infer(model, [text_input([t])], request_id=str(i), outputs=[grpcclient.InferRequestedOutput("LABEL")])
        labels: dict[int, str] = {}
        for _ in texts:
            result, error = answers.get(timeout=60)
            if error is not None:
                raise error
            labels[int(result.get_response().id)] = result.as_numpy("LABEL")[0][0].decode()
    finally:
        client.stop_stream()
    return [labels[i] for i in range(len(texts))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts", nargs="+")
    parser.add_argument("--url", default="localhost:8001")
    parser.add_argument("--model", default="sst2-mux2")
    parser.add_argument("--stream", action="store_true")
    a = parser.parse_args()
    client = grpcclient.InferenceServerClient(a.url)
    labels = classify_streaming(client, a.model, a.texts) if a.stream else classify(client, a.model, a.texts)
    for text, label in zip(a.texts, labels, strict=True):
        print(f"{label:>10}  {text}")


if __name__ == "__main__":
    main()
