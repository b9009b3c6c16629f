"""What a pass of texts in random arrival order costs, by how its mux groups are formed and how
far its packed token rows are padded.

A closed loop of one-text callers hands the scheduler a queue of about a pass of texts in random
order (64 connections over 2 instances: about 25 texts), and the pass takes them all. A mux group
computes as many tokens as its longest text (``packed_cls_states``), so the order that fills the
groups decides the work: ``arrival`` (as they came) or ``sorted`` by length
(``muxserve.serving.scheduler.order_groups``). The packed rows are padded to a multiple of
``--row-multiples`` (``muxbert.PACKED_ROWS_MULTIPLE`` for oneDNN's prepacked bf16 matmuls,
``PLAIN_ROWS_MULTIPLE`` otherwise). Each combination runs the same random passes of real SST-2
dev sentences through ``Engine.infer`` on one instance at the machine's serving precision,
interleaved over ``--rounds``; the best round counts.

    python benchmarks/group_order.py --models sst2-mux5,sst2-bert --texts 25 --row-multiples 64,8
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import muxserve.model.muxbert as muxbert
from muxserve.bench.run import default_sst2_dev, load_texts, machine_info
from muxserve.model.tokenizer import TextTokenizer
from muxserve.serving.engine import Engine, EngineOptions
from muxserve.serving.repository import resolve_model_dir

ROOT = Path(__file__).resolve().parents[1]


def pass_seconds(engine: Engine, passes: list[list[list[int]]], row_multiple: int) -> float:
    """Mean seconds per pass, the packed rows padded to ``row_multiple``."""
    muxbert.PACKED_ROWS_MULTIPLE = muxbert.PLAIN_ROWS_MULTIPLE = row_multiple
    start = time.perf_counter()
    for rows in passes:
        engine.infer(rows)
    return (time.perf_counter() - start) / len(passes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--models", default="sst2-mux5,sst2-bert")
    p.add_argument("--texts", type=int, default=25, help="texts per pass")
    p.add_argument("--passes", type=int, default=40, help="random passes per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--row-multiples", default="64,8")
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the results here as JSON")
    a = p.parse_args(argv)
    texts = load_texts(default_sst2_dev())
    multiples = [int(m) for m in a.row_multiples.split(",")]
    defaults = muxbert.PACKED_ROWS_MULTIPLE, muxbert.PLAIN_ROWS_MULTIPLE
    results = []
    for name in a.models.split(","):
        folder = resolve_model_dir(a.model_repository, name)
        engine = Engine.load(folder, EngineOptions(precision=a.precision, threads=a.threads, instances=1), name=name)
        try:
            ids = TextTokenizer(folder / "tokenizer.json", engine.config.max_seq_length).encode(list(texts)).ids
            rng = random.Random(0)
            orders = {"arrival": [rng.sample(ids, a.texts) for _ in range(a.passes)]}
            orders["sorted"] = [sorted(rows, key=len) for rows in orders["arrival"]]
            cells = [(order, m) for order in orders for m in multiples]
            for order, m in cells:  # every shape once before timing
                pass_seconds(engine, orders[order][:4], m)
            best = dict.fromkeys(cells, float("inf"))
            for r in range(a.rounds):
                for cell in cells if r % 2 == 0 else reversed(cells):
                    best[cell] = min(best[cell], pass_seconds(engine, orders[cell[0]], cell[1]))
        finally:
            muxbert.PACKED_ROWS_MULTIPLE, muxbert.PLAIN_ROWS_MULTIPLE = defaults
            engine.close()
        first = best[cells[0]]
        for (order, m), seconds in best.items():
            row = {"model": name, "precision": engine.options.precision, "texts_per_pass": a.texts, "groups": order, "row_multiple": m, "ms_per_pass": round(seconds * 1e3, 2), "texts_per_s": round(a.texts / seconds, 1), "speedup": round(first / seconds, 3)}
            results.append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"command": "python benchmarks/group_order.py " + " ".join(argv if argv is not None else sys.argv[1:]), "machine": machine_info(), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
