"""``muxserve`` command line: serve, train, eval, export, package, bench."""

# train and eval are defined here; every other command is a module of this package with
# NAME, add_parser(subparsers) and run(args) -> int.

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model: prime | mlm | finetune (resumes from OUT/checkpoint.pt)")
    p.add_argument("stage", choices=["prime", "mlm", "finetune"])
    p.add_argument("--train", nargs="+", required=True, help="TSV file(s) sentence<TAB>label (prime/mlm use the sentences only)")
    p.add_argument("--dev", help="dev TSV for accuracy during fine-tuning")
    p.add_argument("--out", required=True, help="output folder (checkpoint.pt, log.jsonl, best/, final/)")
    p.add_argument("--init", default="backbone", help="'backbone' (all-MiniLM-L6-v2) or a saved model folder (an N=1 model may start a mux model)")
    p.add_argument("--num-instances", "-N", type=int, default=1)
    p.add_argument("--muxing", default="gaussian_hadamard", choices=["gaussian_hadamard", "gaussian_attention_v2"])
    p.add_argument("--hadamard-norm", type=float, default=1.0, help="L2 norm of the fixed instance keys of a new mux model (gaussian_hadamard_norm)")
    p.add_argument("--hadamard-mean", type=float, default=0.0, help="mean of the new keys' distribution, v_i ~ N(mean, I) (0: the reference)")
    p.add_argument("--labels", help="comma-separated label names (default: from the training file)")
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32, help="texts per step (a multiple of N)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--retrieval-coeff", type=float, default=0.0)
    p.add_argument("--retrieval-fraction", type=float, default=1.0, help="share of positions scored by the retrieval loss")
    p.add_argument("--teacher", help="fine-tuned baseline folder to distil from")
    p.add_argument("--transfer", nargs="+", default=[], help="finetune: unlabeled TSV file(s) (sentence column) learned from the teacher's logits alone")
    p.add_argument("--distill-alpha", type=float, default=0.5)
    p.add_argument("--distill-temperature", type=float, default=2.0)
    p.add_argument("--feature-coeff", type=float, default=0.0, help="weight of matching the teacher's final hidden states")
    p.add_argument("--feature-positions", default="all", choices=["cls", "all"], help="hidden states matched: [CLS] only or every token")
    p.add_argument("--freeze-word-embeddings", action="store_true")
    p.add_argument("--learn-muxing", action="store_true", help="train the multiplexer's instance keys too (the reference's learn_muxing)")
    p.add_argument("--mask-group-padding", action="store_true", help="mux model: hide from the encoder the positions no slot of a group fills (default: as the init model; the reference masks nothing)")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--mixed-length-groups", action="store_true", help="mux groups of random texts whatever their lengths (as at eval); default: similar lengths")
    p.add_argument("--copy-curriculum", type=int, default=0, metavar="STEPS", help="finetune: groups hold one text copied into every slot with probability falling from 1 to 0 over STEPS steps")
    p.add_argument("--ema-decay", type=float, default=0.0, help="evaluate and save an exponential moving average of the weights (e.g. 0.999; 0: off)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (autocast); fp32 weights")
    p.add_argument("--device", default="cpu", help="cpu or cuda (a GPU where one is at hand)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="only the first K training rows")


def _run_train(a: argparse.Namespace) -> int:
    from muxserve.training.train import TrainConfig, train

    cfg = TrainConfig(
        stage=a.stage, out=a.out, train_files=a.train, init=a.init, dev_file=a.dev, num_instances=a.num_instances,
        muxing_variant=a.muxing, hadamard_norm=a.hadamard_norm, hadamard_mean=a.hadamard_mean, labels=a.labels.split(",") if a.labels else None, steps=a.steps, epochs=a.epochs,
        batch_size=a.batch_size, lr=a.lr, warmup_ratio=a.warmup_ratio, max_length=a.max_length,
        retrieval_coeff=a.retrieval_coeff, retrieval_fraction=a.retrieval_fraction, teacher=a.teacher, transfer_files=a.transfer, distill_alpha=a.distill_alpha,
        distill_temperature=a.distill_temperature, feature_coeff=a.feature_coeff, feature_positions=a.feature_positions, freeze_word_embeddings=a.freeze_word_embeddings, learn_muxing=a.learn_muxing, mask_group_padding=a.mask_group_padding,
        eval_every=a.eval_every, save_every=a.save_every, threads=a.threads, mixed_length_groups=a.mixed_length_groups, bf16=a.bf16, copy_curriculum_steps=a.copy_curriculum, ema_decay=a.ema_decay, device=a.device, seed=a.seed, limit=a.limit,
    )
    print(json.dumps(train(cfg)))
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy of a model on a TSV file; prints one JSON object")
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--model", required=True, help="model name in the repository, or a model folder")
    p.add_argument("--version", type=int, help="version (default: highest)")
    p.add_argument("--data", required=True, help="TSV sentence<TAB>label with a header; labels 0/1.. or names")
    p.add_argument("--batch-size", type=int, default=256, help="texts per forward pass")
    p.add_argument("--ensemble", action="store_true", help="ensembled prediction (N times the compute)")
    p.add_argument("--repeats", type=int, default=1, help="mean over K draws of the grouping: file order then seeded random orders (ensembled: K scatter seeds)")
    p.add_argument("--limit", type=int)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "fp16", "int8"], help="serving precision (auto: as `muxserve serve` picks it)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def _run_eval(a: argparse.Namespace) -> int:
    import torch

    from muxserve.model.precision import resolve_precision
    from muxserve.model.tokenizer import TextTokenizer
    from muxserve.model.weights import TOKENIZER_FILE, load_for_serving
    from muxserve.serving.repository import resolve_model_dir
    from muxserve.training.data import read_tsv
    from muxserve.training.evaluate import accuracy

    if a.threads:
        torch.set_num_threads(a.threads)
    directory = resolve_model_dir(a.model_repository, a.model, a.version)
    precision = resolve_precision(a.precision, a.device)
    model = load_for_serving(directory, a.device, precision)  # as the engine serves it
    data = read_tsv(a.data, model.config.labels, a.limit)
    tok = TextTokenizer(directory / TOKENIZER_FILE, model.config.max_seq_length)
    result = accuracy(model, tok, data, a.batch_size, a.ensemble, a.repeats)
    print(json.dumps({"model": a.model, "num_instances": model.config.num_instances, "ensemble": a.ensemble, "precision": precision, **result}))
    return 0


COMMAND_MODULES = ("serve", "package", "export", "bench")  # modules of this package: NAME, add_parser, run


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    """The command line's parser and each command's handler. A command whose package is not
    installed is left out: the serving image carries no bench package."""
    parser = argparse.ArgumentParser(prog="muxserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = {"train": _run_train, "eval": _run_eval}
    _add_train(sub)
    _add_eval(sub)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"muxserve.cli.{name}")
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("muxserve."):
                raise
            continue
        handlers[module.NAME] = module.run
        module.add_parser(sub)
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    a = parser.parse_args(argv)
    return handlers[a.command](a) or 0


if __name__ == "__main__":
    sys.exit(main())
