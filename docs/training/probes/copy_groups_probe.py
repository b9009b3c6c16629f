"""Probe: what does a mux model lose when its N slots hold ONE text? Interference or the keyed path?

A mux2 model fine-tuned on groups of two texts can score about the same on SST-2 dev whether a group
holds two sentences or one sentence copied into both slots. That alone does not say whether the keyed input path (``mean_i(E ⊙ v_i)``, the second embedding pass, the demux
MLP) costs accuracy by itself, or whether the model just learned one way of working for two texts.
This probe fine-tunes the same model on groups whose slots all hold one text (each training text
copied N times: the same trainer, losses and teacher, only the grouping differs) and evaluates
on copied groups too. If it comes near the baseline, the keyed path can carry one text at full
accuracy and the loss of the N-text model is interference between the texts of a group.

    python docs/training/probes/copy_groups_probe.py --init model_repository/sst2-mux2/1 --out runs/copy-mux2 \\
        --teacher runs/bert --steps 2500 --threads 1
    python docs/training/probes/copy_groups_probe.py --init runs/bert -N 2 --out runs/copy-bert-mux2 \\
        --teacher runs/bert --steps 2500 --threads 1      # from the baseline: no priming
    python docs/training/probes/copy_groups_probe.py --init runs/bert -N 2 --constant-keys ...  # keys all equal

``runs/bert`` is the bundled sst2-bert copied out of the repository (the teacher caches its logits
beside itself).

Writes OUT/log.jsonl (dev accuracy on copied groups every --eval-every steps), as ``muxserve train``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from muxserve.model.weights import load_config
from muxserve.training.evaluate import correct_in_copied_groups
from muxserve.training.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[3]  # the checkout


class CopyGroupTrainer(Trainer):
    """Every mux group of a training batch holds one text in all its slots; dev accuracy is
    measured on such groups too."""

    def _copy_probability(self) -> float:
        return 1.0  # the trainer's copy curriculum, held at its start

    def evaluate(self) -> dict | None:
        if self.dev is None:
            return None
        right = correct_in_copied_groups(self.model, self.tokenizer, self.dev)[0]  # slot 0, as before
        return {"accuracy": float(right.float().mean()), "n": len(self.dev.texts)}


def main(argv: list[str] | None = None) -> int:
    data = ROOT.parent / "shared" / "data" / "sst2"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", required=True, help="a mux model folder, or the N=1 baseline's (fresh keys and demux)")
    parser.add_argument("--num-instances", "-N", type=int, help="N for a baseline init (default: the init's)")
    parser.add_argument("--hadamard-norm", type=float, default=4.0, help="key norm for a baseline init")
    parser.add_argument("--hadamard-mean", type=float, default=0.0, help="key mean for a baseline init (gaussian_hadamard_mean)")
    parser.add_argument("--constant-keys", action="store_true", help="every key = the same constant vector (a plain rescaling: isolates the cost of random keys from that of the second embedding pass and the demux)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--teacher", required=True, help="the fine-tuned baseline folder")
    parser.add_argument("--train", default=str(data / "train.tsv"))
    parser.add_argument("--dev", default=str(data / "dev.tsv"))
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    cfg = TrainConfig(
        stage="finetune", out=args.out, train_files=[args.train], dev_file=args.dev, init=args.init, num_instances=args.num_instances or load_config(args.init).num_instances,
        hadamard_norm=args.hadamard_norm, hadamard_mean=args.hadamard_mean,
        labels=["negative", "positive"], steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_ratio=0.02, teacher=args.teacher,
        retrieval_coeff=0.1, retrieval_fraction=0.25, eval_every=args.eval_every, threads=args.threads, bf16=True, mixed_length_groups=True,
    )
    trainer = CopyGroupTrainer(cfg)
    if args.constant_keys:
        keys = trainer.model.instance_embedding
        keys.data.fill_(float(keys.norm(dim=-1).mean()) / keys.shape[-1] ** 0.5)
    print(json.dumps({"dev_accuracy_copied_at_start": trainer.evaluate()}))
    print(json.dumps(trainer.run()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
