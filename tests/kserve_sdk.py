"""The ``kserve`` Python SDK, run in its own process by the tests.

kserve's gRPC stubs and tritonclient's register the same protobuf symbols
(``inference.ServerLiveRequest``, ...) in the default descriptor pool, so the two packages cannot be
imported into one process, and the test process imports tritonclient. This script is started with
``python tests/kserve_sdk.py COMMAND ...`` and prints one JSON object.

- ``load FILE...``: every KServe object in the YAML files loaded strictly into the SDK's model
  classes (V1alpha1ServingRuntime, V1beta1InferenceService, ...): a field the class does not
  define, or a value of the wrong type, is an error with its path.
- ``clients HTTP_URL GRPC_URL MODEL...``: server live/ready, then per model ready, metadata and
  one inference of two texts through InferenceRESTClient (v2 protocol) and InferenceGRPCClient.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from typing import Any

SCALAR_TYPES = {"str": str, "int": int, "bool": bool, "float": (int, float)}
KINDS = {"ServingRuntime": "V1alpha1ServingRuntime", "ClusterServingRuntime": "V1alpha1ClusterServingRuntime", "InferenceService": "V1beta1InferenceService"}


class SchemaError(Exception):
    pass


def load_strict(data: Any, type_name: str, where: str) -> Any:
    import kserve
    import kubernetes.client

    if data is None:
        return None
    # kserve's classes write list[X] and dict(str, X); the kubernetes client's List[X] and Dict[str, X]
    if m := re.fullmatch(r"[lL]ist\[(.+)\]", type_name):
        if not isinstance(data, list):
            raise SchemaError(f"{where}: expected a list, got {data!r}")
        return [load_strict(x, m.group(1), f"{where}[{i}]") for i, x in enumerate(data)]
    if m := re.fullmatch(r"[dD]ict[(\[](\w+), (.+)[)\]]", type_name):
        if not isinstance(data, dict):
            raise SchemaError(f"{where}: expected a mapping, got {data!r}")
        return {k: load_strict(v, m.group(2), f"{where}.{k}") for k, v in data.items()}
    if type_name in SCALAR_TYPES:
        if not isinstance(data, SCALAR_TYPES[type_name]) or (type_name == "int" and isinstance(data, bool)):
            raise SchemaError(f"{where}: expected {type_name}, got {data!r}")
        return data
    if type_name in ("object", "ResourceQuantity"):  # int-or-string, quantities, free-form status
        return data
    klass = getattr(kserve, type_name, None) or getattr(kubernetes.client, type_name, None)
    if klass is None:
        raise SchemaError(f"{where}: no model class {type_name}")
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: expected a {type_name} mapping, got {data!r}")
    by_json = {json_name: attr for attr, json_name in klass.attribute_map.items()}
    unknown = sorted(set(data) - set(by_json))
    if unknown:
        raise SchemaError(f"{where}: {type_name} has no field(s) {unknown}")
    kwargs = {by_json[k]: load_strict(v, klass.openapi_types[by_json[k]], f"{where}.{k}") for k, v in data.items()}
    try:
        return klass(**kwargs)
    except ValueError as exc:  # a required field missing or an enum value out of range
        raise SchemaError(f"{where}: {exc}") from exc


def load(paths: list[str]) -> dict[str, Any]:
    import yaml

    loaded, errors = [], []
    for path in paths:
        for doc in yaml.safe_load_all(open(path)):
            if not doc or not str(doc.get("apiVersion", "")).startswith("serving.kserve.io/"):
                continue
            try:
                obj = load_strict(doc, KINDS[doc["kind"]], f"{path}:{doc['kind']}")
                loaded.append({"kind": doc["kind"], "class": type(obj).__name__, "name": obj.metadata.name})
            except (SchemaError, KeyError) as exc:
                errors.append(str(exc))
    return {"loaded": loaded, "errors": errors}


async def clients(http_url: str, grpc_url: str, models: list[str]) -> dict[str, Any]:
    """What KServe's clients read from the server. Their classes have no metadata calls, so
    metadata is read with the SDK's own pieces: its gRPC stub and protobuf messages, and for REST
    a GET on the client's connection parsed by its v2 pydantic models."""
    import numpy as np
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.rest import v2_datamodels as v2

    texts = np.array(["a gripping, beautifully acted film", "dull and far too long"], dtype=object)

    def request(model: str) -> InferRequest:
        tensor = InferInput("TEXT", [len(texts)], "BYTES")
        tensor.set_data_from_numpy(texts)
        return InferRequest(model_name=model, infer_inputs=[tensor], request_id=f"kserve-{model}")

    rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    grpc = InferenceGRPCClient(grpc_url, timeout=60)

    async def rest_get(path: str, model: type) -> dict[str, Any]:
        response = await rest._client.get(rest._construct_url(http_url, path))
        response.raise_for_status()
        return model.model_validate(response.json()).model_dump(exclude_none=True)

    out: dict[str, Any] = {}
    try:
        out["rest"] = {
            "live": await rest.is_server_live(http_url),
            "ready": await rest.is_server_ready(http_url),
            "metadata": await rest_get("v2", v2.ServerMetadataResponse),
            "models": {},
        }
        out["grpc"] = {
            "live": await grpc.is_server_live(),
            "ready": await grpc.is_server_ready(),
            "metadata": _jsonable(await grpc._client_stub.ServerMetadata(pb.ServerMetadataRequest())),
            "models": {},
        }
        for model in models:
            response = await rest.infer(http_url, request(model), model_name=model)
            out["rest"]["models"][model] = {
                "ready": await rest.is_model_ready(http_url, model),
                "ready_body": await rest_get(f"v2/models/{model}/ready", v2.ModelReadyResponse),
                "metadata": await rest_get(f"v2/models/{model}", v2.ModelMetadataResponse),
                "outputs": {o.name: _jsonable(o.data) for o in response.outputs},
                "id": response.id,
            }
            response = await grpc.infer(request(model))
            out["grpc"]["models"][model] = {
                "ready": await grpc.is_model_ready(model),
                "metadata": _jsonable(await grpc._client_stub.ModelMetadata(pb.ModelMetadataRequest(name=model))),
                "outputs": {o.name: _jsonable(o.as_numpy().tolist()) for o in response.outputs},
                "id": response.id,
            }
    finally:
        await rest.close()
        await grpc.close()
    return out


def _jsonable(value: Any) -> Any:
    from google.protobuf.json_format import MessageToDict

    if hasattr(value, "DESCRIPTOR"):
        return MessageToDict(value)
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "load":
        result = load(args)
    elif command == "clients":
        result = asyncio.run(clients(args[0], args[1], args[2:]))
    else:
        raise SystemExit(f"unknown command {command}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
