"""The compiled engine (``--engine compiled``: ``torch.compile`` of the serving forward pass)
against the eager one, forward pass alone, at the pass sizes the server runs.

Each bundled model is loaded twice as the engine serves it (``Engine.load`` at the automatic
precision, ``--instances`` instances of ``--threads`` intra-op threads), once eager and once
compiled. Passes are real SST-2 dev sentences in arrival order (a seeded shuffle cut into passes
of ``--texts``), through the engine's instances side by side as when serving. The two engines run
in interleaved rounds in one process; each reports texts per second and per CPU-second of the
process (its best round: other jobs on the cores only ever slow it), and the largest logit
difference and label agreement against eager on every pass:

    python benchmarks/compiled_engine.py [--models sst2-mux5,sst2-bert] [--texts 8,25,64,145] [--instances 1] [--threads 1] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from muxserve.bench.run import default_sst2_dev, load_texts, machine_info
from muxserve.model.tokenizer import TextTokenizer
from muxserve.serving.engine import Engine
from muxserve.serving.registry import engine_options
from muxserve.serving.repository import resolve_model_dir, scan
from muxserve.serving.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def passes_of(rows: list[list[int]], size: int, seed: int = 0) -> list[list[list[int]]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [[rows[i] for i in order[k : k + size]] for k in range(0, len(order) - size + 1, size)]


def rates(engine: Engine, passes: list[list[list[int]]]) -> tuple[float, float]:
    """(texts per second, texts per CPU-second of the process) over one run through ``passes``
    on the engine's instances side by side."""
    cpu, wall = time.process_time(), time.perf_counter()
    engine.infer_all(passes)
    texts = sum(map(len, passes))
    return texts / (time.perf_counter() - wall), texts / (time.process_time() - cpu)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repository", default=str(ROOT / "model_repository"))
    ap.add_argument("--models", default="sst2-mux5,sst2-bert")
    ap.add_argument("--texts", default="8,25,64,145", help="texts per pass, comma-separated")
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    texts = load_texts(default_sst2_dev())
    results = []
    repository = scan(args.repository)
    for model in args.models.split(","):
        entry = repository[model]
        folder = resolve_model_dir(args.repository, model)
        base = engine_options(entry, Settings(instances=args.instances, threads=args.threads))
        engines = {}
        for kind in ("eager", "compiled"):
            t0 = time.perf_counter()
            base.kind = kind
            engines[kind] = Engine.load(folder, base, name=model)
            print(f"{model} {kind}: loaded in {time.perf_counter() - t0:.1f} s ({base.precision})", flush=True)
        try:
            rows = TextTokenizer(folder / "tokenizer.json", engines["eager"].config.max_seq_length).encode(texts).ids
            for size in map(int, args.texts.split(",")):
                passes = passes_of(rows, size)
                worst, agree, total = 0.0, 0, 0
                for batch in passes:  # every shape once, and the logits compared
                    want, got = engines["eager"].infer(batch), engines["compiled"].infer(batch)
                    worst = max(worst, float(np.abs(want - got).max()))
                    agree += int((want.argmax(1) == got.argmax(1)).sum())
                    total += len(batch)
                rounds: dict[str, list[tuple[float, float]]] = {"eager": [], "compiled": []}
                for r in range(args.rounds):
                    for kind in ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager"):
                        rounds[kind].append(rates(engines[kind], passes))
                point = {"model": model, "texts_per_pass": size, "precision": base.precision, "instances": args.instances, "threads": args.threads, "rounds": rounds}
                for kind in ("eager", "compiled"):
                    point[f"{kind}_texts_per_s"] = max(wall for wall, _ in rounds[kind])
                    point[f"{kind}_texts_per_cpu_s"] = max(cpu for _, cpu in rounds[kind])
                point.update(max_abs_logit_difference=worst, labels_equal=f"{agree}/{total}")
                results.append(point)
                print(
                    f"{model} {size} texts/pass, {args.instances} x {args.threads}: eager {point['eager_texts_per_s']:.0f} texts/s ({point['eager_texts_per_cpu_s']:.0f} per CPU-s), "
                    f"compiled {point['compiled_texts_per_s']:.0f} ({point['compiled_texts_per_cpu_s']:.0f}): {point['compiled_texts_per_s'] / point['eager_texts_per_s']:.2f}x; "
                    f"labels equal {agree}/{total}, max |logit difference| {worst:.3f}",
                    flush=True,
                )
        finally:
            for engine in engines.values():
                engine.close()
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine_info(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
