"""The serving forward pass at the batch sizes the server runs, against the same pass at an
earlier revision of the model file.

Each bundled model is loaded as the engine serves it (``Engine.load``: precision, frozen
projections); the baseline is ``server/muxserve/model/muxbert.py`` read from ``--baseline-rev``
(``git show``) with the same weights and dtype. Passes are real SST-2 dev sentences, a random
sample of ``--texts`` per pass sorted by length (as the scheduler forms them), through
``Engine.infer`` (padding included). The two run in interleaved rounds in one process and each
reports its best round, so that a busy machine slows both alike:

    python benchmarks/forward_pass.py --baseline-rev REV [--models sst2-mux5,sst2-bert] [--threads 1,2] [--texts 16,32,64,145] [--out results.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from muxserve.bench.run import load_texts
from muxserve.model.tokenizer import TextTokenizer
from muxserve.serving.engine import Engine
from muxserve.serving.registry import engine_options
from muxserve.serving.repository import resolve_model_dir, scan
from muxserve.serving.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILE = "server/muxserve/model/muxbert.py"


def model_module_at(rev: str) -> ModuleType:
    """The model file as it was at ``rev``, imported under a name of its own."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{MODEL_FILE}"], check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "muxbert_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("muxbert_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def baseline_engine(served: Engine, module: ModuleType) -> Engine:
    """An engine running ``module``'s model with ``served``'s weights, dtype and options."""
    model = served.forward_fn.__self__  # type: ignore[attr-defined]
    old = module.MuxBertModel(module.MuxBertConfig.from_dict(model.config.to_dict()))
    old.load_state_dict(model.state_dict())
    old = old.to(next(model.parameters()).dtype).eval()
    if hasattr(old, "freeze_for_serving"):
        # the served precision's projections (int8: revisions that serve it)
        int8 = served.options.precision == "int8" and "int8" in inspect.signature(old.freeze_for_serving).parameters
        old.freeze_for_serving(**({"int8": True} if int8 else {}))
    return Engine(old.predict, model.config, served.options, name=served.name)


def texts_per_s(engine: Engine, batches: list[list[list[int]]], seconds: float) -> float:
    texts, start = 0, time.perf_counter()
    while texts == 0 or time.perf_counter() - start < seconds:
        for rows in batches:
            engine.infer(rows)
            texts += len(rows)
    return texts / (time.perf_counter() - start)


def measure(repository: str, model_name: str, module: ModuleType, threads: list[int], sizes: list[int], seconds: float, rounds: int) -> list[dict]:
    directory = resolve_model_dir(repository, model_name)
    served = Engine.load(directory, engine_options(scan(repository)[model_name], Settings()), name=model_name)
    engines = {"baseline": baseline_engine(served, module), "served": served}
    rows = TextTokenizer(directory / "tokenizer.json", served.config.max_seq_length).encode(load_texts()).ids
    out = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for size in sizes:
            rng = random.Random(0)
            batches = [sorted(rng.sample(rows, size), key=len) for _ in range(10)]
            for engine in engines.values():  # warm-up: oneDNN builds its kernels for these shapes
                texts_per_s(engine, batches, 0.0)
            samples: dict[str, list[float]] = {name: [] for name in engines}
            for r in range(rounds):
                for name in list(engines)[r % 2 :] + list(engines)[: r % 2]:
                    samples[name].append(texts_per_s(engines[name], batches, seconds))
            best = {name: max(v) for name, v in samples.items()}
            out.append({"model": model_name, "precision": served.options.precision, "threads": n_threads, "texts_per_pass": size, "texts_per_s": {k: round(v, 1) for k, v in best.items()}, "served_over_baseline": round(best["served"] / best["baseline"], 2)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-rev", required=True, help="git revision whose model file is the baseline")
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--models", default="sst2-mux5,sst2-bert")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--texts", default="16,32,64,145", help="texts per pass")
    p.add_argument("--seconds", type=float, default=1.0, help="per engine per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out")
    a = p.parse_args()
    module = model_module_at(a.baseline_rev)
    threads, sizes = [int(x) for x in a.threads.split(",")], [int(x) for x in a.texts.split(",")]
    results = [row for m in a.models.split(",") if m for row in measure(a.model_repository, m, module, threads, sizes, a.seconds, a.rounds)]
    for row in results:
        t = row["texts_per_s"]
        print(f"{row['model']:<10} {row['precision']} threads {row['threads']} texts/pass {row['texts_per_pass']:>3}: baseline {t['baseline']:.0f}, served {t['served']:.0f} texts/s ({row['served_over_baseline']:.2f}x)", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"torch": torch.__version__, "baseline_rev": a.baseline_rev, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
