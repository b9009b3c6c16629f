"""The bundled recipe (priming, then fine-tuning rounds with distillation, as in
scripts/train_bundled.sh) fitted to a wall-clock budget, for a machine lent for minutes (a GPU).

A short calibration run times a fine-tuning step; priming gets ``--prime-share`` of the steps that
fit in the budget; each fine-tuning round then gets an equal share of the time left, at the step
time the previous stage actually took (so the run ends inside the budget whatever the machine).
Round r > 1 is a warm restart from round r-1's best, as in train_bundled.sh.

    python scripts/train_timed.py -N 2 --teacher runs/sst2-bert/best --train ../shared/data/sst2/train.tsv \\
        --dev ../shared/data/sst2/dev.tsv --out runs/timed-mux2 --budget-s 280 --device cuda --hadamard-mean 1

With ``--mlm-share`` a masked-LM stage with multiplexing (``muxserve train mlm``) follows priming: it
gets that share of the budget's time, its steps sized by a calibration run of its own (so a larger
``--mlm-batch-size``, nearly free on a GPU, is timed as it runs). ``--init-mux`` starts from a mux
model already primed (or MLM-trained) instead: no priming.

Writes OUT/summary.json (step times, each stage's steps and best dev accuracy, the best folder).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from muxserve.training.train import TrainConfig, Trainer

CALIBRATION_STEPS = 60  # timed from the log's step-20 record to the last, after warm-up


def _logged_step_time(out: Path) -> float:
    """Seconds per step between the first and the last step record of a run's log."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step" in r and "loss" in r]
    first, last = steps[0], steps[-1]
    return max(1e-3, (last["time"] - first["time"]) / max(1, last["step"] - first["step"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-N", "--num-instances", type=int, required=True)
    p.add_argument("--teacher", required=True, help="the fine-tuned N=1 baseline: initialisation and teacher")
    p.add_argument("--train", required=True)
    p.add_argument("--dev", required=True)
    p.add_argument("--labels", default="negative,positive")
    p.add_argument("--out", required=True)
    p.add_argument("--budget-s", type=float, required=True, help="wall-clock seconds for the whole recipe, from start-up")
    p.add_argument("--margin-s", type=float, default=15.0, help="kept free at the end (final saves)")
    p.add_argument("--prime-share", type=float, default=0.25)
    p.add_argument("--mlm-share", type=float, default=0.0, help="share of the time left after calibration for a masked-LM stage with multiplexing after priming (0: none)")
    p.add_argument("--mlm-batch-size", type=int, help="texts per MLM step (default: as fine-tuning, 32*N)")
    p.add_argument("--mlm-lr", type=float, default=1e-4)
    p.add_argument("--init-mux", help="a primed mux model with N slots to start from (priming is skipped; its keys are kept)")
    p.add_argument("--mlm-train", nargs="+", help="texts for the MLM stage (TSV sentence column; default: --train)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--min-round-steps", type=int, default=100, help="a round that would get fewer steps is not started")
    p.add_argument("--hadamard-mean", type=float, default=0.0)
    p.add_argument("--ema-decay", type=float, default=0.0, help="fine-tuning: evaluate and keep a moving average of the weights")
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, help="only the first K training rows (smoke runs)")
    a = p.parse_args()
    start = time.time()
    deadline = start + a.budget_s - a.margin_s
    n, out = a.num_instances, Path(a.out)
    common = dict(train_files=[a.train], num_instances=n, batch_size=32 * n, bf16=True, device=a.device, threads=a.threads, labels=a.labels.split(","), limit=a.limit, save_every=10**9, log_every=20)
    norm = round(4 * (n / 2) ** 0.5, 1)  # as train_bundled.sh: the mixture keeps the word-embedding scale

    def finetune(name: str, init: str, steps: int, dev: bool = True) -> TrainConfig:
        return TrainConfig(stage="finetune", out=str(out / name), init=init, teacher=a.teacher, dev_file=a.dev if dev else None, steps=steps, lr=1e-4, warmup_ratio=0.03,
                           retrieval_coeff=0.1, retrieval_fraction=0.25, mixed_length_groups=True, eval_every=max(100, steps // 10), ema_decay=a.ema_decay, hadamard_norm=norm, hadamard_mean=a.hadamard_mean, **common)

    summary: dict = {"num_instances": n, "hadamard_mean": a.hadamard_mean, "init_mux": a.init_mux, "budget_s": a.budget_s, "stages": []}

    def timed(cfg: TrainConfig) -> float:
        """Seconds per step of a short run of ``cfg`` (then deleted)."""
        Trainer(cfg).run(progress=False)
        step_s = _logged_step_time(Path(cfg.out))
        shutil.rmtree(cfg.out)
        return step_s

    step_s = timed(finetune("calibrate", a.teacher, CALIBRATION_STEPS, dev=False))
    summary["calibration_step_s"] = step_s
    seconds_left = deadline - time.time()
    steps_left = seconds_left / step_s
    if a.init_mux:
        init = a.init_mux
    else:
        prime_steps = max(50, int(a.prime_share * steps_left))
        prime = TrainConfig(stage="prime", out=str(out / "prime"), init=a.teacher, steps=prime_steps, lr=5e-4, warmup_ratio=0.05, hadamard_norm=norm, hadamard_mean=a.hadamard_mean, retrieval_fraction=0.5, **common)
        t0 = time.time()
        result = Trainer(prime).run(progress=False)
        summary["stages"].append({**result, "seconds": round(time.time() - t0, 1)})
        init = str(out / "prime" / "final")
        step_s = _logged_step_time(out / "prime")
    if a.mlm_share > 0:
        t0 = time.time()
        mlm_common = {**common, "train_files": a.mlm_train or [a.train], "batch_size": a.mlm_batch_size or common["batch_size"]}

        def mlm(name: str, steps: int) -> TrainConfig:
            return TrainConfig(stage="mlm", out=str(out / name), init=init, steps=steps, lr=a.mlm_lr, warmup_ratio=0.05, mixed_length_groups=True, **mlm_common)

        mlm_step_s = timed(mlm("mlm-calibrate", CALIBRATION_STEPS))
        mlm_steps = max(50, int((a.mlm_share * seconds_left - (time.time() - t0)) / mlm_step_s))
        t0 = time.time()
        result = Trainer(mlm("mlm", mlm_steps)).run(progress=False)
        summary["stages"].append({**result, "seconds": round(time.time() - t0, 1), "batch_size": mlm_common["batch_size"], "calibration_step_s": mlm_step_s})
        init = str(out / "mlm" / "final")
    best, best_dir = -1.0, None
    for r in range(1, a.rounds + 1):
        steps = int((deadline - time.time()) / (a.rounds - r + 1) / step_s)
        if steps < a.min_round_steps:
            summary["stopped"] = f"round {r}: {steps} steps left in the budget"
            break
        t0 = time.time()
        result = Trainer(finetune(f"r{r}", init, steps)).run(progress=False)
        # the next round's step time: this round's wall time per step, evaluations included
        step_s = (time.time() - t0) / steps
        summary["stages"].append({**result, "seconds": round(time.time() - t0, 1), "step_s": round(step_s, 4)})
        init = str(out / f"r{r}" / "best")
        if result["best_dev_accuracy"] is not None and result["best_dev_accuracy"] > best:
            best, best_dir = result["best_dev_accuracy"], init
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary.update(best_dev_accuracy=best, best=best_dir, wall_s=round(time.time() - start, 1))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
