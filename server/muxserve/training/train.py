"""Three-stage training of MUX-BERT (and the N=1 baseline), resumable from checkpoints.

Stages (as in MUX-PLMs): ``prime`` (retrieval loss on unlabeled text: recover every slot's
tokens from the muxed output), ``mlm`` (masked LM with multiplexing, optional), ``finetune``
(task loss, plus an optional retrieval term and optional distillation from a fine-tuned
baseline). Each stage writes ``OUT/checkpoint.pt`` every ``save_every`` steps and resumes from
it; ``OUT/final`` and (with a dev set) ``OUT/best`` hold the results; ``OUT/log.jsonl`` the curves.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from muxserve.model.muxbert import MuxBertModel
from muxserve.model.tokenizer import TextTokenizer
from muxserve.model.weights import TOKENIZER_FILE, backbone_config, load_backbone, load_model, minilm_dir, save_model
from muxserve.training.data import LabeledTexts, group_bucketed_batches, label_names_of, length_bucketed_batches, read_texts, read_tsv
from muxserve.training.evaluate import accuracy, predict

STAGES = ("prime", "mlm", "finetune")
UNLABELED = -1  # label of a transfer-set text: only the teacher's logits train on it


@dataclass
class TrainConfig:
    stage: str
    out: str
    train_files: list[str]
    init: str = "backbone"  # "backbone" (all-MiniLM-L6-v2) or a saved model folder
    dev_file: str | None = None
    num_instances: int = 1
    muxing_variant: str = "gaussian_hadamard"
    # L2 norm of the fixed keys v_i (the reference's gaussian_hadamard_norm; MUX-PLMs use 1.0).
    # Only for a new mux model (backbone or baseline init); a mux init keeps its own keys.
    hadamard_norm: float = 1.0
    hadamard_mean: float = 0.0  # mean of the new keys' distribution (gaussian_hadamard_mean)
    labels: list[str] | None = None  # default: from the training file
    steps: int = 0  # 0: derive from epochs
    epochs: float = 1.0
    batch_size: int = 32  # texts per step (B*N)
    lr: float = 1e-4
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_length: int = 64
    retrieval_coeff: float = 0.0  # finetune: weight of the auxiliary retrieval loss
    retrieval_fraction: float = 1.0  # share of positions scored by the retrieval loss (it costs a vocab projection each)
    teacher: str | None = None  # finetune: a fine-tuned baseline folder to distil from
    # finetune: unlabeled texts (sentence column of TSVs) learned from the teacher's logits alone,
    # a distillation transfer set beside the labeled data
    transfer_files: list[str] = field(default_factory=list)
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    # finetune: match the teacher's final hidden states per text (MSE / teacher mean square);
    # "cls" the [CLS] position only, "all" every real token (denser: also keeps slots apart)
    feature_coeff: float = 0.0
    feature_positions: str = "all"
    mlm_probability: float = 0.15
    freeze_word_embeddings: bool = False
    # train the multiplexer's keys v_i too (the reference's learn_muxing); saved in the config
    learn_muxing: bool = False
    # hide the positions no slot of a group fills from the encoder (the model's
    # mask_group_padding, saved in its config); False keeps what the init model does
    mask_group_padding: bool = False
    eval_every: int = 200
    save_every: int = 100
    log_every: int = 20
    threads: int = 0  # 0: leave torch's default
    # mux groups of texts drawn at random whatever their lengths (as at evaluation), instead of
    # similar-length texts only; whole groups are still bucketed by length
    mixed_length_groups: bool = False
    # finetune: over the first K steps a mux group holds one text copied into all its slots with a
    # probability falling linearly from 1 to 0, so a model started from the baseline meets the
    # keyed input path before it has to keep texts apart (0: off)
    copy_curriculum_steps: int = 0
    # an exponential moving average of the weights (decay per step; 0: off) is what evaluations
    # score and what best/ and final/ hold: it smooths the step-to-step swings of dev accuracy
    ema_decay: float = 0.0
    bf16: bool = False  # autocast the forward/backward to bfloat16 (mixed precision)
    device: str = "cpu"  # "cuda" trains on a GPU (batches built on the CPU, moved per step)
    seed: int = 0
    limit: int | None = None  # use only the first K training rows (tests, smoke runs)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}")
        if self.batch_size % self.num_instances:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of num_instances {self.num_instances}")
        if self.feature_positions not in ("cls", "all"):
            raise ValueError("feature_positions must be 'cls' or 'all'")
        if self.feature_coeff > 0 and not self.teacher:
            raise ValueError("feature_coeff needs a teacher")
        if self.transfer_files and (self.stage != "finetune" or not self.teacher):
            raise ValueError("transfer_files needs stage finetune and a teacher (their only targets are its logits)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("ema_decay must be in [0, 1)")
        if self.stage in ("prime", "mlm") and self.num_instances < 2:
            raise ValueError(f"stage {self.stage} needs num_instances >= 2 (it trains the demultiplexer)")


def _init_model(cfg: TrainConfig, labels: list[str]) -> MuxBertModel:
    if cfg.init == "backbone":
        model = MuxBertModel(backbone_config(num_instances=cfg.num_instances, muxing_variant=cfg.muxing_variant, labels=labels, max_seq_length=cfg.max_length, seed=cfg.seed, gaussian_hadamard_norm=cfg.hadamard_norm, gaussian_hadamard_mean=cfg.hadamard_mean))
        load_backbone(model)
        return model
    src = load_model(cfg.init)
    if src.config.num_instances == 1 and cfg.num_instances > 1:
        return _mux_from_baseline(src, cfg, labels)
    if src.config.num_instances != cfg.num_instances:
        raise ValueError(f"{cfg.init} has num_instances={src.config.num_instances}, not {cfg.num_instances}")
    if src.config.labels == labels:
        return src.train()
    # new task: same body, fresh classifier
    conf = src.config.from_dict({**src.config.to_dict(), "labels": labels})
    model = MuxBertModel(conf)
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("classifier.") for k in missing)
    return model


def _mux_from_baseline(src: MuxBertModel, cfg: TrainConfig, labels: list[str]) -> MuxBertModel:
    """A mux model whose encoder (and classifier, same labels) start from a fine-tuned N=1
    model; the keys, the demultiplexer and the retrieval head start fresh."""
    conf = src.config.from_dict({**src.config.to_dict(), "num_instances": cfg.num_instances, "muxing_variant": cfg.muxing_variant, "labels": labels, "seed": cfg.seed, "gaussian_hadamard_norm": cfg.hadamard_norm, "gaussian_hadamard_mean": cfg.hadamard_mean})
    model = MuxBertModel(conf)
    state = src.state_dict()
    if src.config.labels != labels:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    fresh = ("instance_embedding", "muxing_attention", "demux_module.", "demultiplexer.", "retrieval_head.", "classifier.")
    assert not unexpected and all(k.startswith(fresh) for k in missing), (unexpected, missing)
    return model


def _tokenizer_path(cfg: TrainConfig) -> Path:
    if cfg.init != "backbone" and (Path(cfg.init) / TOKENIZER_FILE).exists():
        return Path(cfg.init) / TOKENIZER_FILE
    return minilm_dir() / TOKENIZER_FILE


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def _mask_tokens(ids: torch.Tensor, mask: torch.Tensor, prob: float, vocab: int, mask_id: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: of the chosen positions 80% [MASK], 10% random, 10% kept."""
    real = mask.bool()
    real[:, 0] = False
    real &= ids != 102  # [SEP]
    chosen = (torch.rand(ids.shape, generator=gen) < prob) & real
    action = torch.rand(ids.shape, generator=gen)
    masked = ids.clone()
    masked[chosen & (action < 0.8)] = mask_id
    rand_pos = chosen & (action >= 0.8) & (action < 0.9)
    masked[rand_pos] = torch.randint(1000, vocab, (int(rand_pos.sum()),), generator=gen)
    return masked, chosen


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        if cfg.stage == "finetune":
            labels = cfg.labels or label_names_of(cfg.train_files[0])
            data = read_tsv(cfg.train_files[0], labels, cfg.limit)
            for extra in cfg.train_files[1:]:
                more = read_tsv(extra, labels)
                data = LabeledTexts(data.texts + more.texts, data.labels + more.labels)
            transfer = read_texts(cfg.transfer_files)
            data = LabeledTexts(data.texts + transfer, data.labels + [UNLABELED] * len(transfer))
        else:
            labels = cfg.labels or ["negative", "positive"]
            texts = read_texts(cfg.train_files)
            data = LabeledTexts(texts[: cfg.limit] if cfg.limit else texts, [])
        self.labels = labels
        self.data = data
        self.tokenizer_path = _tokenizer_path(cfg)
        self.tokenizer = TextTokenizer(self.tokenizer_path, cfg.max_length)
        self.ids = self.tokenizer.encode(data.texts).ids
        self.dev = read_tsv(cfg.dev_file, labels) if cfg.dev_file else None
        self.device = torch.device(cfg.device)
        self.model = _init_model(cfg, labels).to(self.device)
        self.model.config.max_seq_length = cfg.max_length
        if cfg.learn_muxing:
            if not self.model.config.is_mux:
                raise ValueError("learn_muxing needs a mux model (num_instances >= 2)")
            self.model.config.learn_muxing = True
            self.model.instance_embedding.requires_grad_(True)
        if cfg.mask_group_padding:
            if not self.model.config.is_mux:
                raise ValueError("mask_group_padding needs a mux model (the baseline masks all padding)")
            self.model.config.mask_group_padding = True
        if cfg.freeze_word_embeddings:
            self.model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
        self.steps_per_epoch = math.ceil(len(self.ids) / cfg.batch_size)
        self.total_steps = cfg.steps or max(1, int(cfg.epochs * self.steps_per_epoch))
        params = [p for p in self.model.parameters() if p.requires_grad]
        # no weight decay on biases, norms and the multiplexer keys (decay would shrink the keys)
        keys = self.model.instance_embedding if self.model.config.is_mux else None
        decay = [p for p in params if p.ndim >= 2 and p is not keys]
        no_decay = [p for p in params if p.ndim < 2 or p is keys]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(self.total_steps, int(cfg.warmup_ratio * self.total_steps)))
        self.step = 0
        self.best = -1.0
        # the averaged weights, fp32, beside the model's (float tensors of the state dict)
        self.ema = self._float_state() if cfg.ema_decay > 0 else None
        self._ema_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # (averaged, live), built at the first update
        self.teacher_logits = self._teacher_logits() if cfg.teacher and cfg.stage == "finetune" else None
        self.teacher_states = self._teacher_states() if cfg.feature_coeff > 0 and cfg.stage == "finetune" else None
        self._resume()

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def _resume(self) -> None:
        if not self.checkpoint_path.exists():
            return
        ck = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        if ck["train_config"]["stage"] != self.cfg.stage:
            raise ValueError(f"{self.checkpoint_path} is from stage {ck['train_config']['stage']}, not {self.cfg.stage}")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.step, self.best = ck["step"], ck["best"]
        if self.ema is not None:  # a checkpoint written without EMA starts the average at its weights
            self.ema = ck.get("ema") or self._float_state()
        self._log({"event": "resumed", "step": self.step, "best": self.best})

    def _save_checkpoint(self) -> None:
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "step": self.step, "best": self.best, "ema": self.ema, "train_config": asdict(self.cfg)}, tmp)
        os.replace(tmp, self.checkpoint_path)

    def _log(self, record: dict) -> None:
        record = {"time": round(time.time(), 1), **record}
        with open(self.out / "log.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ teacher

    def _teacher_cache(self, kind: str) -> Path:
        """Teacher outputs are computed once and cached beside the teacher, keyed by the texts,
        so every N distils from the same run of the teacher."""
        key = hashlib.sha1("\n".join(self.data.texts).encode() + str(self.cfg.max_length).encode()).hexdigest()[:16]
        return Path(self.cfg.teacher) / f"teacher-{kind}-{key}.pt"

    def _load_teacher(self) -> MuxBertModel:
        teacher = load_model(self.cfg.teacher).to(self.device)
        if teacher.config.num_instances != 1:
            raise ValueError("the teacher must be a plain (N=1) model")
        if teacher.config.labels != self.labels:
            raise ValueError(f"teacher labels {teacher.config.labels} != {self.labels}")
        return teacher

    def _order_by_length(self) -> list[int]:
        """Training texts shortest first: the teacher is N=1, so grouping does not matter and
        similar lengths pad little; callers restore the text order."""
        return sorted(range(len(self.ids)), key=lambda i: len(self.ids[i]))

    def _teacher_logits(self) -> torch.Tensor:
        """The baseline's logits on the training texts [T, C]."""
        cache = self._teacher_cache("logits")
        if cache.exists():
            return torch.load(cache)
        teacher = self._load_teacher()
        order = self._order_by_length()
        logits = predict(teacher, TextTokenizer(Path(self.cfg.teacher) / TOKENIZER_FILE, self.cfg.max_length), [self.data.texts[i] for i in order], batch_texts=256)
        restored = torch.empty_like(logits)
        restored[torch.tensor(order)] = logits
        torch.save(restored, cache)
        return restored

    @torch.no_grad()
    def _teacher_states(self) -> dict[str, torch.Tensor]:
        """The baseline's final hidden states on the training texts, fp16, all texts' real tokens
        concatenated: ``states [sum(len), d]`` and ``offsets [T+1]`` (row i is
        ``states[offsets[i]:offsets[i+1]]``); ``scale`` is their mean square."""
        cache = self._teacher_cache("states")
        if cache.exists():
            return torch.load(cache)
        teacher = self._load_teacher().eval()
        lengths = torch.tensor([len(r) for r in self.ids])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        states = torch.empty(int(offsets[-1]), teacher.config.hidden_size, dtype=torch.float16)
        order = self._order_by_length()
        for start in range(0, len(order), 256):
            rows = order[start : start + 256]
            ids, mask = self.tokenizer.pad([self.ids[i] for i in rows])
            hidden = teacher.slot_features(ids.to(self.device), mask.to(self.device), cls_only=False).cpu()
            for j, i in enumerate(rows):
                states[offsets[i] : offsets[i + 1]] = hidden[j, : lengths[i]].half()
        result = {"states": states, "offsets": offsets, "scale": states[:: max(1, len(states) // 100_000)].float().pow(2).mean()}
        torch.save(result, cache)
        return result

    def _feature_loss(self, features: torch.Tensor, batch: list[int], mask: torch.Tensor) -> torch.Tensor:
        """MSE between the student's per-text features [T, L', d] and the teacher's, over real
        tokens (L' = 1: [CLS] only), relative to the teacher's mean square."""
        ts = self.teacher_states
        assert ts is not None
        target = torch.zeros_like(features)
        for j, i in enumerate(batch):
            row = ts["states"][ts["offsets"][i] : ts["offsets"][i + 1]][: features.shape[1]]
            target[j, : len(row)] = row.float()
        weight = mask[:, : features.shape[1]].to(features.dtype)[..., None]
        return ((features - target).pow(2) * weight).sum() / (weight.sum() * features.shape[-1] * ts["scale"])

    # ------------------------------------------------------------------ one step

    def _loss(self, batch: list[int], gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        ids, mask = self.tokenizer.pad([self.ids[i] for i in batch])
        stats: dict = {}
        if cfg.stage == "mlm":
            masked, chosen = _mask_tokens(ids, mask, cfg.mlm_probability, self.model.config.vocab_size, 103, gen)
            if not chosen.any():
                chosen[0, 1] = True
            masked, chosen = masked.to(self.device), chosen.to(self.device)
        ids, mask = ids.to(self.device), mask.to(self.device)
        if cfg.stage == "prime":
            logits, targets = self.model.retrieval_logits(ids, mask, gen, cfg.retrieval_fraction)
            loss = F.cross_entropy(logits, targets)
            stats["retrieval_acc"] = float((logits.argmax(-1) == targets).float().mean())
            return loss, stats
        if cfg.stage == "mlm":
            logits = self.model.mlm_logits(masked, mask, chosen)
            targets = ids[chosen]
            stats["mlm_acc"] = float((logits.argmax(-1) == targets).float().mean())
            return F.cross_entropy(logits, targets), stats
        labels = torch.tensor([self.data.labels[i] for i in batch], device=self.device)
        retrieval = cfg.retrieval_coeff > 0 and self.model.config.is_mux
        # one encoder pass serves the task, the feature and the retrieval terms
        hidden = self.model.encode(ids, mask)
        cls_only = self.teacher_states is None or cfg.feature_positions == "cls"
        features = self.model.slot_features_from(hidden, cls_only)
        logits = self.model.classify(features[:, :1]).float()
        if self.teacher_states is not None:
            feature_loss = self._feature_loss(features.float(), batch, mask)
            stats["feature_loss"] = feature_loss.item()
        labeled = labels != UNLABELED
        if labeled.any():
            loss = F.cross_entropy(logits[labeled], labels[labeled])
            stats["train_acc"] = float((logits[labeled].argmax(-1) == labels[labeled]).float().mean())
        else:  # a batch of transfer texts only
            loss = logits.sum() * 0.0
        stats["task_loss"] = loss.item()
        if self.teacher_logits is not None:
            t = cfg.distill_temperature
            soft = F.softmax(self.teacher_logits[batch].to(self.device) / t, dim=-1)
            kd = F.kl_div(F.log_softmax(logits / t, dim=-1), soft, reduction="batchmean") * t * t
            loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kd
            stats["distill_loss"] = kd.item()
        if self.teacher_states is not None:
            loss = loss + cfg.feature_coeff * feature_loss
        if retrieval:
            r_logits, r_targets = self.model.retrieval_logits_from(hidden, ids, mask, gen, cfg.retrieval_fraction)
            r_loss = F.cross_entropy(r_logits.float(), r_targets)
            loss = loss + cfg.retrieval_coeff * r_loss
            stats["retrieval_loss"] = r_loss.item()
        return loss, stats

    def _batches(self):
        """Batches from the current step on: epoch e's order depends only on (seed, e)."""
        lengths = [len(r) for r in self.ids]
        epoch, skip = divmod(self.step, self.steps_per_epoch)
        while True:
            rng = random.Random(self.cfg.seed * 1000 + epoch)
            if self.cfg.mixed_length_groups:
                epoch_batches = group_bucketed_batches(lengths, self.cfg.batch_size, self.cfg.num_instances, rng)
            else:
                epoch_batches = length_bucketed_batches(lengths, self.cfg.batch_size, rng)
            for i, batch in enumerate(epoch_batches):
                if i < skip:
                    continue
                if len(batch) % self.cfg.num_instances:
                    batch = batch[: len(batch) - len(batch) % self.cfg.num_instances]
                if batch:
                    yield self._copy_groups(batch)
            epoch, skip = epoch + 1, 0

    def _copy_probability(self) -> float:
        """Chance that a group holds one text in every slot: 1 - step / copy_curriculum_steps."""
        k = self.cfg.copy_curriculum_steps
        return max(0.0, 1.0 - self.step / k) if k > 0 else 0.0

    def _copy_groups(self, batch: list[int]) -> list[int]:
        """Replace each group by copies of its first text with probability ``_copy_probability``
        (seeded by step: the same after a resume)."""
        n, p = self.cfg.num_instances, self._copy_probability()
        if p <= 0 or n < 2:
            return batch
        rng = random.Random(self.cfg.seed * 1_000_003 + self.step)
        out: list[int] = []
        for g in range(0, len(batch), n):
            group = batch[g : g + n]
            out.extend([group[0]] * n if rng.random() < p else group)
        return out

    # ------------------------------------------------------------------ weight averaging

    def _float_state(self) -> dict[str, torch.Tensor]:
        """An fp32 copy of the model's floating-point state (the EMA's start)."""
        return {k: v.detach().clone().float() for k, v in self.model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def _update_ema(self) -> None:
        """ema = d·ema + (1-d)·w, d ramped up as (1+step)/(10+step) so the start is not frozen in."""
        assert self.ema is not None
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        if self._ema_pairs is None:  # the live tensors stay the same objects: load_state_dict copies in place
            state = self.model.state_dict()
            self._ema_pairs = ([self.ema[k] for k in self.ema], [state[k] for k in self.ema])
        averaged, live = self._ema_pairs
        torch._foreach_mul_(averaged, decay)
        torch._foreach_add_(averaged, [t.float() for t in live], alpha=1 - decay)

    @contextmanager
    def _averaged_weights(self):
        """Inside: the model holds the averaged weights (no-op without EMA); restored after."""
        if self.ema is None:
            yield
            return
        raw = {k: v.detach().clone() for k, v in self.model.state_dict().items() if k in self.ema}
        self.model.load_state_dict(self.ema, strict=False)
        try:
            yield
        finally:
            self.model.load_state_dict(raw, strict=False)

    # ------------------------------------------------------------------ loop

    def evaluate(self) -> dict | None:
        if self.dev is None or self.cfg.stage != "finetune":
            return None
        return accuracy(self.model, self.tokenizer, self.dev)

    def run(self, progress: bool = True) -> dict:
        cfg = self.cfg
        self.model.train()
        gen = torch.Generator().manual_seed(cfg.seed + self.step)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=f"{cfg.stage} N={cfg.num_instances}", dynamic_ncols=True)
        self._log({"event": "start", "step": self.step, "total_steps": self.total_steps, "config": asdict(cfg)})
        window: list[dict] = []
        batches = self._batches()
        while self.step < self.total_steps:
            batch = next(batches)
            # bf16 autocast: matmuls in bfloat16, weights and optimizer state stay fp32
            # (2.4x faster steps on this AVX512-BF16 CPU: benchmarks/train_step.py)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss, stats = self._loss(batch, gen)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            if self.ema is not None:
                self._update_ema()
            window.append({"loss": loss.item(), **stats})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                keys = dict.fromkeys(k for w in window for k in w)  # train_acc is absent on transfer-only steps
                mean = {k: sum(w[k] for w in window if k in w) / sum(k in w for w in window) for k in keys}
                self._log({"step": self.step, "lr": self.scheduler.get_last_lr()[0], **mean})
                window = []
            if self.dev is not None and cfg.stage == "finetune" and (self.step % cfg.eval_every == 0 or self.step == self.total_steps):
                # with EMA the raw weights are scored too (logged only), to show what averaging adds
                raw = self.evaluate() if self.ema is not None else None
                with self._averaged_weights():
                    result = self.evaluate()
                    assert result is not None
                    self._log({"step": self.step, "dev_accuracy": result["accuracy"], "dev_n": result["n"], **({"ema": True, "dev_accuracy_raw": raw["accuracy"]} if raw else {})})
                    if bar is not None:
                        bar.write(f"step {self.step}: dev accuracy {result['accuracy']:.4f}")
                    if result["accuracy"] > self.best:
                        self.best = result["accuracy"]
                        save_model(self.model, self.out / "best", torch.float32, self.tokenizer_path)
                self.model.train()
            if self.step % cfg.save_every == 0:
                self._save_checkpoint()
        if bar is not None:
            bar.close()
        self._save_checkpoint()
        with self._averaged_weights():
            save_model(self.model, self.out / "final", torch.float32, self.tokenizer_path)
        summary = {"stage": cfg.stage, "steps": self.step, "best_dev_accuracy": self.best if self.best >= 0 else None, "out": str(self.out)}
        self._log({"event": "done", **summary})
        return summary


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    return Trainer(cfg).run(progress)
