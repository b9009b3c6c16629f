"""Which int8 the engine serves on a CPU without bf16 units: accuracy and speed of dynamic int8
schemes against fp32, each bundled model, one process, interleaved rounds.

Schemes (FBGEMM's dynamic int8 matmul: weights quantized once, each pass's activations over
their own range):

- ``fp32``: the served fp32 forward, the reference;
- ``first_layer_fp32``: ``--precision int8`` for a model with ``int8_first_layer`` 1 (sst2-bert):
  weights per output channel, activations on the full 8 bits, the encoder's projections past
  its first layer;
- ``all_layers``: the same on every encoder layer (``int8_first_layer`` 0: sst2-mux2, sst2-mux5);
- ``reduced_range``: ``first_layer_fp32`` with activations on 7 bits (FBGEMM's advice against
  int16 saturation on CPUs without VNNI);
- ``quantize_dynamic``: ``torch.ao.quantization.quantize_dynamic`` with its defaults on every
  ``nn.Linear`` (weights per tensor, 7-bit activations), which is what infinity-emb's
  ``--dtype int8`` does to a model on CPU.

For each: SST-2 dev accuracy (mean of 5 groupings), the share of labels that differ from fp32 on
``--flip-texts`` SST-2 training sentences (a larger sample than dev, for choosing a scheme
without tuning on dev), and forward texts/s on one thread at the given texts per pass (SST-2 dev
sentences sorted by length, as the scheduler groups them; best of ``--rounds``):

    python benchmarks/int8_schemes.py [--models sst2-bert,sst2-mux5] [--texts 24,145] [--out docs/bench/int8.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from muxserve.bench.run import load_texts, machine_info
from muxserve.model import muxbert
from muxserve.model.muxbert import MuxBertModel, inference_layers
from muxserve.model.tokenizer import TextTokenizer
from muxserve.model.weights import TOKENIZER_FILE, load_for_serving, load_model
from muxserve.serving.repository import resolve_model_dir
from muxserve.training.data import read_tsv
from muxserve.training.evaluate import accuracy, predict

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = ("fp32", "first_layer_fp32", "all_layers", "reduced_range", "quantize_dynamic")


class ReducedRange:
    """An int8 projection called with FBGEMM's 7-bit activation range."""

    def __init__(self, projection: muxbert.InferenceLinear) -> None:
        self.int8 = projection.int8

    def __call__(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x, self.int8, True)
        return F.gelu(y) if gelu else y


def scheme_model(directory: Path, scheme: str) -> MuxBertModel:
    if scheme == "fp32":
        return load_for_serving(directory, "cpu", "fp32")
    model = load_model(directory)
    if scheme == "quantize_dynamic":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        model.predict = model.forward  # the quantized modules replace the weights the packed forward reads
        return model
    layers = inference_layers(model.bert.encoder, int8=True, int8_first_layer=0 if scheme == "all_layers" else 1)
    if scheme == "reduced_range":
        for layer in layers:
            for attr in ("qkv", "attention_out", "ffn_in", "ffn_out"):
                if getattr(layer, attr).int8 is not None:
                    setattr(layer, attr, ReducedRange(getattr(layer, attr)))
    model.serving_layers = layers
    return model


def texts_per_s(model: MuxBertModel, batches: list[tuple[torch.Tensor, torch.Tensor]], seconds: float) -> float:
    texts, start = 0, time.perf_counter()
    with torch.inference_mode():
        while texts == 0 or time.perf_counter() - start < seconds:
            for ids, mask in batches:
                model.predict(ids, mask)
                texts += ids.shape[0]
    return texts / (time.perf_counter() - start)


def measure(directory: Path, name: str, a: argparse.Namespace) -> list[dict]:
    models = {s: scheme_model(directory, s) for s in SCHEMES}
    config = models["fp32"].config
    tok = TextTokenizer(directory / TOKENIZER_FILE, config.max_seq_length)
    dev = read_tsv(a.data, config.labels)
    train = read_tsv(a.train, config.labels)
    flip_texts = random.Random(1).sample(train.texts, min(a.flip_texts, len(train.texts)))
    reference = predict(models["fp32"], tok, flip_texts).argmax(-1)
    rows = {s: {"model": name, "scheme": s, "int8_first_layer": config.int8_first_layer} for s in SCHEMES}
    for s, model in models.items():
        rows[s]["sst2_dev_accuracy_mean5"] = round(accuracy(model, tok, dev, repeats=5)["accuracy"], 4)
        rows[s]["label_flips_vs_fp32"] = round(float((predict(model, tok, flip_texts).argmax(-1) != reference).float().mean()), 4)
    sentences = load_texts()
    torch.set_num_threads(a.threads)
    for size in a.texts:
        rng = random.Random(0)
        batches = [tok(sorted(rng.sample(sentences, size), key=len)) for _ in range(8)]
        for model in models.values():
            texts_per_s(model, batches, 0.0)  # warm-up
        samples: dict[str, list[float]] = {s: [] for s in SCHEMES}
        for r in range(a.rounds):
            for s in SCHEMES[r % len(SCHEMES) :] + SCHEMES[: r % len(SCHEMES)]:
                samples[s].append(texts_per_s(models[s], batches, a.seconds))
        for s in SCHEMES:
            rows[s][f"texts_per_s_{size}"] = round(max(samples[s]), 1)
            rows[s][f"speed_vs_fp32_{size}"] = round(max(samples[s]) / max(samples["fp32"]), 2)
    return list(rows.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--models", default="sst2-bert,sst2-mux2,sst2-mux5")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"))
    p.add_argument("--train", default=str(ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"))
    p.add_argument("--flip-texts", type=int, default=4000)
    p.add_argument("--texts", default="24,145", help="texts per pass, comma-separated")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (the server runs one per instance on a small CPU)")
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out")
    a = p.parse_args()
    a.texts = [int(x) for x in a.texts.split(",")]
    results = [row for m in a.models.split(",") if m for row in measure(resolve_model_dir(a.model_repository, m), m, a)]
    for row in results:
        speeds = ", ".join(f"{k.removeprefix('speed_vs_fp32_')} texts/pass {v:.2f}x" for k, v in row.items() if k.startswith("speed_vs_fp32_"))
        print(f"{row['model']:<10} {row['scheme']:<17} dev {100 * row['sst2_dev_accuracy_mean5']:.2f}  flips {100 * row['label_flips_vs_fp32']:.2f}%  {speeds}", flush=True)
    if a.out:
        machine = machine_info()
        Path(a.out).write_text(json.dumps({"machine": f"{machine['cpu']}, {machine['cores']} cores", "torch": torch.__version__, "threads": a.threads, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
