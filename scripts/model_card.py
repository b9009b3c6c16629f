"""Measure the bundled models and write model_repository/MODELS.json + a markdown table.

SST-2 dev accuracy (plain and ensembled; in file order and the mean of 5 groupings or scatter
seeds) of the weights as served (fp16 / int8 embeddings) at the serving precision (``auto``: bf16
on CPUs with bf16 units, else int8 on x86 CPUs with AVX2, else fp32), the plain mean of 5 in fp32
and in int8 (where this CPU runs FBGEMM) beside it, and the serving forward pass's throughput at
sequence length 64 and equal texts per batch at that precision, all models in one run:

    python scripts/model_card.py [--model-repository model_repository] [--data ../shared/data/sst2/dev.tsv] [--precision auto] [--threads 2]

The accuracy part is most of the cost (the ensembled scores run each text N times, 5 times over).
``--keep-accuracy`` takes it from the existing MODELS.json (measuring only what it lacks) and
measures the forward pass: for when the code changed and the weights did not (the tests check
the card's accuracy against ``muxserve eval``). The table also goes to docs/bench/model_card.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from muxserve.bench.run import machine_info
from muxserve.cli.bench import bench_models
from muxserve.model.precision import cpu_has_fast_int8, resolve_precision
from muxserve.model.tokenizer import TextTokenizer
from muxserve.model.weights import TOKENIZER_FILE, load_for_serving
from muxserve.serving.repository import resolve_model_dir, scan
from muxserve.training.data import read_tsv
from muxserve.training.evaluate import accuracy

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 5


def _pct(value: float | None) -> str:
    return f"{100 * value:.1f}" if value is not None else "–"


def _mean_accuracy(directory: Path, precision: str, data_path: str) -> float:
    """SST-2 dev accuracy, mean of REPEATS groupings, of the model as served at ``precision``."""
    model = load_for_serving(directory, "cpu", precision)
    tok = TextTokenizer(directory / TOKENIZER_FILE, model.config.max_seq_length)
    return accuracy(model, tok, read_tsv(data_path, model.config.labels), repeats=REPEATS)["accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"))
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-ensemble", action="store_true")
    p.add_argument("--keep-accuracy", action="store_true", help="reuse the accuracy and size of the existing MODELS.json")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench" / "model_card.md"), help="the markdown table")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8"], help="the serving precision the card is for (CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    precision = resolve_precision(a.precision, "cpu")

    repo = Path(a.model_repository)
    entries = scan(repo)
    weighted = [m for m in entries if entries[m].config.platform != "ensemble"]  # a family has no weights of its own
    models = sorted(weighted, key=lambda m: (int(entries[m].parameter("num_instances", "1") or 1), m))
    card: dict[str, dict] = {}
    previous = json.loads((repo / "MODELS.json").read_text()) if a.keep_accuracy else {}
    int8 = cpu_has_fast_int8()
    for name in models:
        directory = resolve_model_dir(repo, name)
        int8_key = f"sst2_dev_accuracy_mean{REPEATS}_int8"
        if name in previous:
            card[name] = {k: v for k, v in previous[name].items() if not k.startswith("forward_")}
            if int8 and int8_key not in card[name]:
                card[name][int8_key] = round(_mean_accuracy(directory, "int8", a.data), 4)
                print(f"{name}: {card[name]}", file=sys.stderr)
            continue
        model = load_for_serving(directory, "cpu", precision)
        tok = TextTokenizer(directory / TOKENIZER_FILE, model.config.max_seq_length)
        data = read_tsv(a.data, model.config.labels)
        # one score is one draw of the grouping (mux models): file order, as `muxserve eval`, and
        # the mean over REPEATS draws (`muxserve eval --repeats`), plain and ensembled
        plain = accuracy(model, tok, data, repeats=REPEATS)
        ens = None if a.no_ensemble or model.config.num_instances == 1 else accuracy(model, tok, data, ensemble=True, repeats=REPEATS)
        size = sum(f.stat().st_size for f in (repo / name).rglob("*") if f.is_file())
        card[name] = {
            "num_instances": model.config.num_instances,
            "precision": precision,
            "sst2_dev_accuracy": plain["accuracy_per_repeat"][0],
            "sst2_dev_n": plain["n"],
            f"sst2_dev_accuracy_mean{REPEATS}": round(plain["accuracy"], 4),
            "sst2_dev_accuracy_ensemble": ens["accuracy_per_repeat"][0] if ens else None,
            f"sst2_dev_accuracy_ensemble_mean{REPEATS}": round(ens["accuracy"], 4) if ens else None,
            f"sst2_dev_accuracy_mean{REPEATS}_fp32": round(plain["accuracy"] if precision == "fp32" else _mean_accuracy(directory, "fp32", a.data), 4),
            "size_mb": round(size / 2**20, 1),
        }
        if int8:
            card[name][int8_key] = round(plain["accuracy"] if precision == "int8" else _mean_accuracy(directory, "int8", a.data), 4)
        print(f"{name}: {card[name]}", file=sys.stderr)
    bench = bench_models(str(repo), models, seq_len=64, batch_texts=320, seconds=a.seconds, rounds=a.rounds, precision=precision, log=lambda line: print(line, file=sys.stderr))
    for row in bench:
        card[row["model"]].update(forward_texts_per_s=round(row["texts_per_s"], 1), forward_ratio_to_baseline=round(row["ratio_to_baseline"], 2), forward_threads=row["threads"], forward_precision=row["precision"])
    machine = machine_info()
    meta = {"machine": f"{machine['cpu']}, {machine['cores']} cores", "torch": torch.__version__, "seq_len": 64, "batch_texts": 320, "precision": precision, "threads": bench[0]["threads"]}
    (repo / "MODELS.json").write_text(json.dumps(card, indent=2) + "\n")
    card_precision = next(iter(card.values()))["precision"]
    keys = ["sst2_dev_accuracy", f"sst2_dev_accuracy_mean{REPEATS}", f"sst2_dev_accuracy_mean{REPEATS}_fp32", f"sst2_dev_accuracy_mean{REPEATS}_int8", "sst2_dev_accuracy_ensemble", f"sst2_dev_accuracy_ensemble_mean{REPEATS}"]
    lines = [
        f"Accuracy on SST-2 dev (872 sentences) at the card's precision, {card_precision} (the first two columns and the ensembled ones), with the mean of {REPEATS} groupings in fp32 and in int8 beside it. "
        f"The serving forward pass alone at sequence length {meta['seq_len']}, {meta['batch_texts']} texts per batch, {precision}, {meta['threads']} threads, {meta['machine']}, torch {meta['torch']}.",
        f"Command: `python scripts/model_card.py --threads {meta['threads']}{' --keep-accuracy' if a.keep_accuracy else ''}`",
        "",
        f"| model | N | SST-2 dev acc | mean of {REPEATS} groupings | same, fp32 | same, int8 | ensembled | ensembled, mean of {REPEATS} | forward texts/s (len 64) | × sst2-bert | size MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in card.items():
        accuracies = " | ".join(_pct(c.get(key)) for key in keys)
        lines.append(f"| {name} | {c['num_instances']} | {accuracies} | {c['forward_texts_per_s']:.0f} | {c['forward_ratio_to_baseline']:.2f}× | {c['size_mb']} |")
    Path(a.out).write_text("# The bundled models\n\n" + "\n".join(lines) + "\n")
    print(json.dumps(meta))
    print("\n".join(lines[3:]))


if __name__ == "__main__":
    main()
