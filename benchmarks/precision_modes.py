"""How to run half precision on this CPU: bf16 weights (``model.to(bfloat16)``, what the engine
does) against fp32 weights under ``torch.autocast(bfloat16)``, with fp32 as the reference.

Forward-pass texts/s of each bundled model at its served batch (``preferred_batch_size`` texts)
and at the given lengths, the three modes measured in interleaved rounds in one process (a
model's figure is its best round), so that a busy machine slows every mode alike:

    python benchmarks/precision_modes.py [--models sst2-bert,sst2-mux5] [--lengths 32,64] [--threads 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from muxserve.bench.run import served_batch_texts
from muxserve.model.weights import load_config, load_model
from muxserve.serving.repository import resolve_model_dir

ROOT = Path(__file__).resolve().parents[1]
MODES = ("fp32", "bf16_autocast", "bf16_weights")


def texts_per_s(model: torch.nn.Module, ids: torch.Tensor, autocast: bool, seconds: float) -> float:
    mask = torch.ones_like(ids)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.inference_mode(), context:
        model(ids, mask)  # warm-up: oneDNN builds its kernels for this shape
        runs, start = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - start < seconds:
            model(ids, mask)
            runs += 1
        return runs * ids.shape[0] / (time.perf_counter() - start)


def measure(repository: str, model_name: str, lengths: list[int], seconds: float, rounds: int) -> list[dict]:
    directory = resolve_model_dir(repository, model_name)
    n = load_config(directory).num_instances
    batch = served_batch_texts(repository, model_name, n)
    fp32 = load_model(directory)
    bf16 = load_model(directory, dtype=torch.bfloat16)
    setups = {"fp32": (fp32, False), "bf16_autocast": (fp32, True), "bf16_weights": (bf16, False)}
    out = []
    for length in lengths:
        ids = torch.randint(1000, 20000, (batch, length), generator=torch.Generator().manual_seed(0))
        samples: dict[str, list[float]] = {m: [] for m in MODES}
        for r in range(rounds):
            for k in range(len(MODES)):
                mode = MODES[(k + r) % len(MODES)]
                model, autocast = setups[mode]
                samples[mode].append(texts_per_s(model, ids, autocast, seconds))
        best = {m: max(v) for m, v in samples.items()}
        out.append({"model": model_name, "num_instances": n, "batch_texts": batch, "seq_len": length, "texts_per_s": {m: round(v, 1) for m, v in best.items()},
                    "bf16_weights_over_autocast": round(best["bf16_weights"] / best["bf16_autocast"], 2), "bf16_weights_over_fp32": round(best["bf16_weights"] / best["fp32"], 2)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--models", default="sst2-bert,sst2-mux2,sst2-mux5")
    p.add_argument("--lengths", default="32,64")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=2.0, help="per mode per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    lengths = [int(x) for x in a.lengths.split(",")]
    results = [row for m in a.models.split(",") if m for row in measure(a.model_repository, m, lengths, a.seconds, a.rounds)]
    report = {"torch": torch.__version__, "threads": a.threads, "results": results}
    for row in results:
        print(f"{row['model']:<10} len {row['seq_len']:>3} batch {row['batch_texts']:>3}: " + ", ".join(f"{m} {v:.0f}" for m, v in row["texts_per_s"].items()) + f"  (weights/autocast {row['bf16_weights_over_autocast']:.2f}x)")
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
