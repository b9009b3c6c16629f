"""MUX-BERT model: shapes, short groups, slot routing, the N=1 baseline, ensembling, losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from muxtiny import CLS, PAD, SEP, TINY_VOCAB, random_batch, tiny_config, tiny_model

from muxserve.model.muxbert import MuxBertConfig, MuxBertModel, attention_spans

torch.set_num_threads(1)

VARIANTS = ("gaussian_hadamard", "gaussian_attention_v2")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("n", [1, 2, 5, 10])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("task", ["sequence_classification", "token_classification"])
def test_output_shapes(n: int, variant: str, task: str) -> None:
    labels = ["a", "b", "c"]
    model = tiny_model(num_instances=n, muxing_variant=variant, task=task, labels=labels)
    length = 9
    # full groups, one text, and counts that are not a multiple of N
    for texts in sorted({1, n, 2 * n, 2 * n + 1, 3 * n - 1} - {0}):
        ids, mask = random_batch(texts, length, gen(texts))
        with torch.no_grad():
            out = model(ids, mask)
        expected = (texts, len(labels)) if task == "sequence_classification" else (texts, length, len(labels))
        assert tuple(out.shape) == expected, (texts, out.shape)
        assert torch.isfinite(out).all()


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        tiny_config(num_instances=0)
    with pytest.raises(ValueError):
        tiny_config(muxing_variant="nope")
    with pytest.raises(ValueError):
        tiny_config(task="nope")
    with pytest.raises(ValueError):
        tiny_config(short_group_policy="nope")
    with pytest.raises(ValueError):
        tiny_config(hidden_size=30, num_attention_heads=4)
    cfg = tiny_config(num_instances=5)
    assert MuxBertConfig.from_dict({**cfg.to_dict(), "unknown_key": 1}) == cfg


# --------------------------------------------------------------------------- the N=1 baseline


def test_n1_is_a_plain_bert_state_dict() -> None:
    keys = set(tiny_model(num_instances=1).state_dict())
    assert not [k for k in keys if k.startswith(("instance_embedding", "demux_module", "demultiplexer", "retrieval_head", "muxing_attention"))]
    assert "classifier.weight" in keys and "bert.embeddings.word_embeddings.weight" in keys
    mux = set(tiny_model(num_instances=2).state_dict())
    assert {"instance_embedding", "demux_module.demux_instance_embedding", "demux_module.dense_1.weight", "demux_module.dense_2.weight", "demultiplexer.pre_decoder.weight", "retrieval_head.bias"} <= mux


@pytest.mark.parametrize("task", ["sequence_classification", "token_classification"])
def test_n1_padding_mask(task: str) -> None:
    """A text alone gives the same logits as inside a longer, padded batch with other texts."""
    model = tiny_model(num_instances=1, task=task)
    ids, mask = random_batch(4, 16, gen(1), min_len=10)
    ids[2, 5:], mask[2, 5:] = PAD, 0
    ids[2, 4] = SEP
    alone_ids = ids[2:3, :5]
    with torch.no_grad():
        alone = model(alone_ids, torch.ones_like(alone_ids))
        batched = model(ids, mask)
    if task == "sequence_classification":
        torch.testing.assert_close(batched[2], alone[0], atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(batched[2, :5], alone[0], atol=1e-5, rtol=0)
    # and the padding actually matters: without the mask the logits move
    with torch.no_grad():
        unmasked = model(ids, torch.ones_like(mask))
    assert (unmasked[2] - batched[2]).abs().max() > 1e-4


def test_n1_permutation_equivariant() -> None:
    model = tiny_model(num_instances=1)
    ids, mask = random_batch(7, 12, gen(2))
    perm = torch.randperm(7, generator=gen(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids[perm], mask[perm]), model(ids, mask)[perm], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_n1_equals_huggingface_bert() -> None:
    """N=1 is BERT's encoder + a linear classifier on the [CLS] state (no pooler)."""
    model = tiny_model(num_instances=1)
    cfg = model.config
    hf_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id, hidden_act="gelu",
    )
    hf = transformers.BertModel(hf_cfg, add_pooling_layer=False).eval()
    missing, unexpected = hf.load_state_dict(model.bert.state_dict(), strict=False)
    assert not unexpected and all("position_ids" in k or "token_type_ids" in k for k in missing)
    ids, mask = random_batch(5, 14, gen(4))
    with torch.no_grad():
        cls_state = hf(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        torch.testing.assert_close(model(ids, mask), model.classifier(cls_state), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- short groups


@pytest.mark.parametrize("variant", VARIANTS)
def test_short_group_copy_equals_explicit_group(variant: str) -> None:
    """Policy "copy": the last group is filled round robin with its own real texts, and a text's
    logits equal those of the full group built explicitly with the same copies."""
    n, t = 5, 7
    model = tiny_model(num_instances=n, muxing_variant=variant, short_group_policy="copy")
    ids, mask = random_batch(t, 10, gen(5))
    real = [5, 6]
    group = [real[i % len(real)] for i in range(n)]  # [5, 6, 5, 6, 5]
    with torch.no_grad():
        out = model(ids, mask)
        explicit = model(ids[group], mask[group])
        full = model(ids[:5], mask[:5])
    assert out.shape[0] == t
    torch.testing.assert_close(out[5:], explicit[:2], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:5], full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_short_group_pad_equals_explicit_group(variant: str) -> None:
    """Policy "pad": empty slots hold a [CLS][SEP] text; same logits as the explicit group."""
    n, t = 4, 6
    model = tiny_model(num_instances=n, muxing_variant=variant, short_group_policy="pad")
    ids, mask = random_batch(t, 10, gen(6))
    filler_ids = torch.full((2, 10), PAD, dtype=torch.long)
    filler_ids[:, 0], filler_ids[:, 1] = CLS, SEP
    filler_mask = (filler_ids != PAD).long()
    with torch.no_grad():
        out = model(ids, mask)
        explicit = model(torch.cat([ids[4:], filler_ids]), torch.cat([mask[4:], filler_mask]))
    assert out.shape[0] == t
    torch.testing.assert_close(out[4:], explicit[:2], atol=1e-5, rtol=0)


def test_short_group_policies_agree_on_full_groups() -> None:
    """The filler policy only touches the short group: the full groups' logits are identical."""
    n, t = 5, 12
    copy = tiny_model(num_instances=n, short_group_policy="copy")
    pad = tiny_model(num_instances=n, short_group_policy="pad")
    pad.load_state_dict(copy.state_dict())
    ids, mask = random_batch(t, 10, gen(7))
    with torch.no_grad():
        a, b = copy(ids, mask), pad(ids, mask)
    assert a.shape == b.shape == (t, 2)
    torch.testing.assert_close(a[:10], b[:10], atol=1e-5, rtol=0)
    assert (a[10:] - b[10:]).abs().max() > 0  # the short group did see different fillers


# --------------------------------------------------------------------------- mux groups and slots


@pytest.mark.parametrize("n", [2, 5])
@pytest.mark.parametrize("variant", VARIANTS)
def test_groups_are_independent(n: int, variant: str) -> None:
    """Changing the texts of one group leaves every other group's outputs exactly as they were."""
    model = tiny_model(num_instances=n, muxing_variant=variant)
    ids, mask = random_batch(3 * n, 10, gen(8))
    other_ids, other_mask = random_batch(n, 10, gen(9))
    ids2, mask2 = ids.clone(), mask.clone()
    ids2[n : 2 * n], mask2[n : 2 * n] = other_ids, other_mask
    with torch.no_grad():
        a, b = model(ids, mask), model(ids2, mask2)
    torch.testing.assert_close(a[:n], b[:n], atol=1e-5, rtol=0)
    torch.testing.assert_close(a[2 * n :], b[2 * n :], atol=1e-5, rtol=0)
    assert (a[n : 2 * n] - b[n : 2 * n]).abs().max() > 1e-4


@pytest.mark.parametrize("n", [2, 5])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("task", ["sequence_classification", "token_classification"])
def test_group_padding_mask_makes_outputs_batch_independent(n: int, variant: str, task: str) -> None:
    """With mask_group_padding a group's logits are the same alone (padded to its own longest
    text) as in a batch padded further for a longer group; without it (the reference) they move."""
    ids, mask = random_batch(2 * n, 16, gen(12), min_len=3)
    ids[:n, 7:], mask[:n, 7:] = PAD, 0  # group 0: at most 7 tokens; group 1 reaches 16
    ids[:n, 6] = torch.where(mask[:n, 6].bool(), SEP, ids[:n, 6])
    for masked in (True, False):
        model = tiny_model(num_instances=n, muxing_variant=variant, task=task, mask_group_padding=masked)
        with torch.no_grad():
            alone = model(ids[:n, :7], mask[:n, :7])
            batched = model(ids, mask)[:n]
        if task == "token_classification":
            batched = batched[:, :7]
        gap = (alone - batched).abs().max()
        assert gap < 1e-5 if masked else gap > 1e-4, (masked, gap)


def test_group_padding_mask_keeps_positions_any_slot_fills() -> None:
    """The mask hides only positions no slot fills: the short text still sees (and is moved by)
    the tokens of its longer partner beyond its own end."""
    model = tiny_model(num_instances=2, mask_group_padding=True)
    ids, mask = random_batch(2, 12, gen(13), min_len=12)
    ids[0, 5:], mask[0, 5:] = PAD, 0
    ids[0, 4] = SEP
    changed = ids.clone()
    changed[1, 9] = 50 if int(ids[1, 9]) != 50 else 51
    with torch.no_grad():
        assert (model(ids, mask)[0] - model(changed, mask)[0]).abs().max() > 1e-5


@pytest.mark.parametrize("n", [2, 5])
def test_permuting_groups_permutes_outputs(n: int) -> None:
    model = tiny_model(num_instances=n)
    ids, mask = random_batch(3 * n, 10, gen(10))
    groups = torch.tensor([2, 0, 1])
    rows = (groups[:, None] * n + torch.arange(n)).reshape(-1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids[rows], mask[rows]), model(ids, mask)[rows], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_slot_interference_and_order(variant: str) -> None:
    """N=2: the text in slot 1 moves the output of slot 0 (they share one sequence), the output
    count and order stay, and swapping the slots is not a mere swap of outputs (slot keys)."""
    model = tiny_model(num_instances=2, muxing_variant=variant)
    ids, mask = random_batch(2, 10, gen(11))
    ids2 = ids.clone()
    ids2[1, 1:-1] = torch.randint(10, TINY_VOCAB, (8,), generator=gen(12))
    with torch.no_grad():
        a = model(ids, mask)
        b = model(ids2, mask)
        swapped = model(ids[[1, 0]], mask[[1, 0]])
    assert a.shape == b.shape == (2, 2)
    assert (a[0] - b[0]).abs().max() > 1e-6
    assert (swapped - a[[1, 0]]).abs().max() > 1e-6


@pytest.mark.parametrize("n", [2, 5])
def test_row_reads_its_own_slot(n: int) -> None:
    """Row b*N+i is demultiplexed with slot key k_i from group b's shared [CLS] state."""
    model = tiny_model(num_instances=n)
    ids, mask = random_batch(2 * n, 10, gen(13))
    with torch.no_grad():
        out = model(ids, mask)
        hidden = model.encode(ids, mask)[:, 0]  # [B, d]
        keys = model.demux_module.demux_instance_embedding
        for row in range(2 * n):
            b, i = divmod(row, n)
            feat = model.demultiplexer(model.demux_module.mlp(keys[i], hidden[b]))
            torch.testing.assert_close(out[row], model.classifier(feat), atol=1e-5, rtol=0)


def test_mux_forces_cls_at_position_0() -> None:
    """index_pos reads every slot at the shared position 0, which always holds [CLS]."""
    model = tiny_model(num_instances=2)
    ids, mask = random_batch(4, 8, gen(14))
    ids2 = ids.clone()
    ids2[:, 0] = 42
    with torch.no_grad():
        torch.testing.assert_close(model(ids2, mask), model(ids, mask), atol=0, rtol=0)


def test_instance_keys_fixed_and_seeded() -> None:
    """Keys v_i have norm ``gaussian_hadamard_norm``, depend on the config's seed only (not on the
    global RNG), and are not trained unless ``learn_muxing``."""
    a = tiny_model(seed=1, num_instances=5, gaussian_hadamard_norm=2.0)
    b = tiny_model(seed=2, num_instances=5, gaussian_hadamard_norm=2.0)  # other init, same key seed
    torch.testing.assert_close(a.instance_embedding, b.instance_embedding)
    torch.testing.assert_close(a.instance_embedding.norm(dim=-1), torch.full((5,), 2.0))
    assert not a.instance_embedding.requires_grad
    assert tiny_model(num_instances=2, learn_muxing=True).instance_embedding.requires_grad
    other = MuxBertModel(tiny_config(num_instances=5, gaussian_hadamard_norm=2.0, seed=3))
    assert (other.instance_embedding - a.instance_embedding).abs().max() > 0.1


def test_instance_key_mean_shifts_the_same_draws() -> None:
    """``gaussian_hadamard_mean`` draws v_i ~ N(mean, I) from the same seed: 0 is the reference's
    keys exactly; a mean makes the keys alike (cosine ~ mean^2 / (1 + mean^2)) at the same norm."""
    from muxserve.model.muxbert import random_instance_keys

    reference = random_instance_keys(2, 384, 4.0, seed=0)
    torch.testing.assert_close(random_instance_keys(2, 384, 4.0, seed=0, mean=0.0), reference)
    shifted = random_instance_keys(2, 384, 4.0, seed=0, mean=2.0)
    torch.testing.assert_close(shifted.norm(dim=-1), torch.full((2,), 4.0))
    cosine = float(F.cosine_similarity(shifted[0], shifted[1], dim=0))
    assert 0.7 < cosine < 0.9 and abs(float(F.cosine_similarity(reference[0], reference[1], dim=0))) < 0.2
    model = tiny_model(num_instances=2, gaussian_hadamard_mean=2.0)
    assert float(model.instance_embedding.mean()) > 0
    assert MuxBertConfig.from_dict(model.config.to_dict()).gaussian_hadamard_mean == 2.0


# --------------------------------------------------------------------------- ensembling


@pytest.mark.parametrize("n", [2, 5])
@pytest.mark.parametrize("task", ["sequence_classification", "token_classification"])
def test_ensemble_shape_and_determinism(n: int, task: str) -> None:
    model = tiny_model(num_instances=n, task=task)
    ids, mask = random_batch(2 * n + 1, 9, gen(15))
    plain = model(ids, mask)
    e1 = model.predict_ensemble(ids, mask, gen(0))
    e2 = model.predict_ensemble(ids, mask, gen(0))
    e3 = model.predict_ensemble(ids, mask, gen(1))
    assert e1.shape == plain.shape
    torch.testing.assert_close(e1, e2, atol=0, rtol=0)
    assert (e1 - e3).abs().max() > 0  # another draw of slots and groups
    assert (e1 - plain).abs().max() > 0


def test_ensemble_averages_the_copies() -> None:
    """predict_ensemble = mean over the N scattered copies of each text (recomputed by hand)."""
    n, t = 2, 4
    model = tiny_model(num_instances=n)
    ids, mask = random_batch(t, 9, gen(16))
    g = gen(5)
    order = torch.cat([torch.randperm(t, generator=g) for _ in range(n)])
    with torch.no_grad():
        logits = model(ids[order], mask[order])
    expected = torch.stack([logits[order == i].mean(0) for i in range(t)])
    torch.testing.assert_close(model.predict_ensemble(ids, mask, gen(5)), expected, atol=1e-6, rtol=0)


def test_ensemble_n1_equals_forward() -> None:
    model = tiny_model(num_instances=1)
    ids, mask = random_batch(5, 9, gen(17))
    with torch.no_grad():
        torch.testing.assert_close(model.predict_ensemble(ids, mask, gen(0)), model(ids, mask), atol=0, rtol=0)


# --------------------------------------------------------------------------- training heads


@pytest.mark.parametrize("variant", VARIANTS)
def test_retrieval_logits_targets(variant: str) -> None:
    n = 2
    model = tiny_model(num_instances=n, muxing_variant=variant)
    ids, mask = random_batch(2 * n, 10, gen(18))
    logits, targets = model.retrieval_logits(ids, mask, gen(0))
    assert logits.shape == (targets.shape[0], TINY_VOCAB)
    # one scored position per group and position at most, never [CLS] position 0, never a pad
    assert 0 < targets.shape[0] <= 2 * (10 - 1)
    assert (targets != PAD).all() and (targets != CLS).all()
    # a fraction of the positions only (the vocabulary projection is the costly part)
    few, few_targets = model.retrieval_logits(ids, mask, gen(0), fraction=0.3)
    assert few.shape[0] == few_targets.shape[0] < targets.shape[0]
    loss = F.cross_entropy(logits, targets)
    loss.backward()
    assert model.demux_module.dense_1.weight.grad is not None
    assert model.instance_embedding.grad is None  # fixed keys


def test_mlm_logits_reads_each_slot() -> None:
    n = 2
    model = tiny_model(num_instances=n)
    ids, mask = random_batch(2 * n, 10, gen(19), min_len=6)
    chosen = torch.zeros_like(mask, dtype=torch.bool)
    chosen[0, 2] = chosen[3, 4] = chosen[1, 1] = True
    with torch.no_grad():
        logits = model.mlm_logits(ids, mask, chosen)
        hidden = model.encode(ids, mask)
        w = model.bert.embeddings.word_embeddings.weight
        keys = model.demux_module.demux_instance_embedding
        rows, cols = chosen.nonzero(as_tuple=True)
        for p, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
            expect = F.linear(model.retrieval_head(model.demux_module.mlp(keys[r % n], hidden[r // n, c])), w, model.retrieval_head.bias)
            torch.testing.assert_close(logits[p], expect, atol=1e-5, rtol=0)
    assert logits.shape == (3, TINY_VOCAB)


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("masked", [True, False])
def test_predict_equals_forward(n: int, variant: str, masked: bool) -> None:
    """The serving path (real tokens only, the last layer at position 0 only) gives forward's
    logits: texts of mixed lengths, a short last group, and a mux model that does not mask the
    group padding (predict then runs the padded encoder). Lengths 3-60: attention runs in spans
    of 16, 32, 48 and 64 positions, the sequences taken out of their order and put back."""
    for texts in (1, 3 * n - 1, 4 * n, 12 * n):
        ids, mask = random_batch(texts, 60, gen(texts), min_len=3)
        model = tiny_model(num_instances=n, muxing_variant=variant, mask_group_padding=masked)
        with torch.no_grad():
            expected = model(ids, mask)
        got = model.predict(ids, mask)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [1, 5])
def test_frozen_predict_in_bf16_follows_forward(n: int) -> None:
    """A served model (``freeze_for_serving``: fused QKV, on CPU in bf16 oneDNN-prepacked
    projections with GELU fused) answers as the unfrozen bf16 predict, and as the fp32 forward,
    within bf16 rounding."""
    model = tiny_model(num_instances=n, mask_group_padding=True)
    for layer in model.bert.encoder.layer:  # weights large enough for logits well away from 0
        for lin in (layer.attention.self.query, layer.attention.self.key, layer.intermediate.dense):
            torch.nn.init.normal_(lin.weight, std=0.3)
    torch.nn.init.normal_(model.classifier.weight, std=1.0)
    ids, mask = random_batch(4 * n - 1, 24, gen(7), min_len=3)
    with torch.no_grad():
        expected = model(ids, mask)
    half = model.to(torch.bfloat16)
    unfrozen = half.predict(ids, mask).float()
    frozen = half.freeze_for_serving().predict(ids, mask).float()
    scale = float(expected.abs().max())  # logits span about +-5..10 here
    assert scale > 2.0
    torch.testing.assert_close(frozen, unfrozen, atol=0.02 * scale, rtol=0)
    torch.testing.assert_close(frozen, expected, atol=0.02 * scale, rtol=0)


def test_training_drops_the_frozen_projections() -> None:
    """Weights changed in training mode reach predict afterwards: nothing stale is served."""
    model = tiny_model(num_instances=2, mask_group_padding=True).freeze_for_serving()
    ids, mask = random_batch(4, 16, gen(3))
    before = model.predict(ids, mask)
    model.train()
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.value.weight.mul_(3.0)
    model.eval()
    with torch.no_grad():
        expected = model(ids, mask)
    got = model.predict(ids, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, before, atol=1e-4, rtol=0)


def test_predict_token_task_is_forward() -> None:
    """A token-level model reads every position: predict is forward."""
    ids, mask = random_batch(6, 16, gen(3))
    model = tiny_model(num_instances=2, task="token_classification")
    with torch.no_grad():
        expected = model(ids, mask)
    torch.testing.assert_close(model.predict(ids, mask), expected, atol=0, rtol=0)


def test_attention_spans_pad_each_length_to_its_own() -> None:
    """Sequences in ascending padded length: a span per padded length, each padded to its own
    longest (at least 16, in steps of 16); tokens and rows counted on in packed order."""
    spans = attention_spans([3, 16, 17, 30, 64], torch.float32, torch.device("cpu"), by_length=True)
    assert [(s.rows, s.tokens, s.length) for s in spans] == [((0, 2), (0, 19), 16), ((2, 4), (19, 66), 32), ((4, 5), (66, 130), 64)]
    assert spans[1].flat.tolist() == list(range(17)) + list(range(32, 62))
    # the padding places of a span read their own sequence's first token
    assert spans[1].gather.tolist() == list(range(19, 36)) + [19] * 15 + list(range(36, 66)) + [36] * 2
    assert spans[1].bias.shape == (2, 1, 1, 32) and bool((spans[1].bias[0, 0, 0, 17:] < -1e30).all()) and bool((spans[1].bias[:, 0, 0, :17] == 0).all())
    one = attention_spans([3, 16, 17, 30, 64], torch.float32, torch.device("cpu"), by_length=False)
    assert [(s.rows, s.tokens, s.length) for s in one] == [((0, 5), (0, 130), 64)]
