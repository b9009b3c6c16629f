"""Evaluation: a mux model's score is one draw of the grouping; --repeats averages several."""

from __future__ import annotations

import json
import random

import pytest
import torch
from muxtiny import WORDS, save_tiny, tiny_model

from muxserve.cli import main
from muxserve.model.tokenizer import TextTokenizer
from muxserve.model.weights import TOKENIZER_FILE
from muxserve.training.data import LabeledTexts
from muxserve.training.evaluate import accuracy, correct_in_copied_groups, correct_per_repeat, predict


def labeled(count: int = 30, seed: int = 0) -> LabeledTexts:
    rng = random.Random(seed)
    return LabeledTexts([" ".join(rng.sample(WORDS, rng.randint(2, 9))) for _ in range(count)], [rng.randint(0, 1) for _ in range(count)])


@pytest.fixture
def mux2(tmp_path):
    model = tiny_model(num_instances=2).eval()
    folder = save_tiny(model, tmp_path / "m")
    return model, TextTokenizer(folder / TOKENIZER_FILE, 32), folder


def test_repeats_are_seeded_groupings_and_ensemble_seeds(mux2) -> None:
    model, tok, _ = mux2
    data = labeled()
    target = torch.tensor(data.labels)
    right = correct_per_repeat(model, tok, data, repeats=3)
    assert right.shape == (3, 30)
    # repeat 0 is file order, exactly what a plain evaluation scores
    assert torch.equal(right[0], predict(model, tok, data.texts).argmax(-1) == target)
    # repeat k > 0: the texts grouped in a seeded random order, each answer put back in place
    rng = random.Random(0)
    for k in (1, 2):
        order = list(range(30))
        rng.shuffle(order)
        pred = torch.empty(30, dtype=torch.long)
        pred[torch.tensor(order)] = predict(model, tok, [data.texts[i] for i in order]).argmax(-1)
        assert torch.equal(right[k], pred == target)
    # the groupings differ, so the answers do somewhere (a mux model's partners matter)
    logits = [predict(model, tok, [data.texts[i] for i in o]) for o in (list(range(30)), order)]
    assert not torch.allclose(logits[0][torch.tensor(order)], logits[1], atol=1e-5)
    ensembled = correct_per_repeat(model, tok, data, repeats=2, ensemble=True)
    for k in (0, 1):
        assert torch.equal(ensembled[k], predict(model, tok, data.texts, ensemble=True, seed=k).argmax(-1) == target)
    result = accuracy(model, tok, data, repeats=3)
    assert result["accuracy"] == pytest.approx(float(right.float().mean())) and result["repeats"] == 3
    assert result["accuracy_per_repeat"] == [round(float(r.float().mean()), 4) for r in right]
    single = accuracy(model, tok, data)
    assert single["correct"] == int(right[0].sum()) and "repeats" not in single
    with pytest.raises(ValueError, match="repeats"):
        accuracy(model, tok, data, repeats=0)


def test_eval_cli_repeats(mux2, tmp_path, capsys) -> None:
    model, tok, folder = mux2
    data = labeled()
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(data.texts, data.labels, strict=True)))
    assert main(["eval", "--model", str(folder), "--data", str(tsv), "--repeats", "3"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["repeats"] == 3 and len(out["accuracy_per_repeat"]) == 3 and out["n"] == 30
    assert out["accuracy"] == pytest.approx(sum(out["accuracy_per_repeat"]) / 3, abs=1e-4)


def test_plain_model_runs_one_pass_for_every_repeat(tmp_path, monkeypatch) -> None:
    """N=1 reads each text alone, so its groupings cannot differ: one pass fills every repeat."""
    import muxserve.training.evaluate as evaluate

    model = tiny_model(num_instances=1).eval()
    tok = TextTokenizer(save_tiny(model, tmp_path / "b") / TOKENIZER_FILE, 32)
    data = labeled()
    calls = []
    real = evaluate.predict
    monkeypatch.setattr(evaluate, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))
    right = correct_per_repeat(model, tok, data, repeats=4)
    assert right.shape == (4, 30) and len(calls) == 1
    assert all(torch.equal(r, right[0]) for r in right)
    assert torch.equal(right[0], real(model, tok, data.texts).argmax(-1) == torch.tensor(data.labels))


def test_copied_groups_put_one_text_in_every_slot(mux2) -> None:
    model, tok, _ = mux2
    data = labeled(count=12)
    copied = [t for t in data.texts for _ in range(2)]
    # an untrained head answers one class for everything: centre it so that the answers vary
    with torch.no_grad():
        margin = predict(model, tok, copied) @ torch.tensor([1.0, -1.0])
        model.classifier.bias[0] -= margin.median() + 1e-4
    logits = predict(model, tok, copied).view(12, 2, -1)  # group t holds text t in both slots
    assert 0 < int(logits.argmax(-1).sum()) < 24
    model.train()
    right = correct_in_copied_groups(model, tok, data)
    assert model.training  # the caller's mode is put back
    assert right.shape == (2, 12)
    target = torch.tensor(data.labels)
    for slot in (0, 1):  # row i is slot i's answer for each text
        assert torch.equal(right[slot], logits[:, slot].argmax(-1) == target)
