"""Session 8 probe: forward cost of a mean-pooled readout (every position demultiplexed) against
the shared position 0, for the bundled models, as measured before the readout was removed.

    python docs/training/v8-probes/pooltime.py
"""

from __future__ import annotations

import time

import torch

from muxserve.model.weights import load_model

torch.set_num_threads(2)


def texts_per_s(fn, texts: int, seconds: float = 6.0) -> float:
    with torch.no_grad():
        fn()
        start, runs = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            fn()
            runs += 1
    return runs * texts / (time.perf_counter() - start)


def main() -> None:
    ids = torch.randint(1000, 20000, (320, 64))
    mask = torch.ones_like(ids)
    rates = {}
    for name in ["sst2-bert", "sst2-mux2", "sst2-mux5"]:
        model = load_model(f"model_repository/{name}/1").eval()

        def pooled(model=model):
            full_ids, full_mask = model.fill_short_group(ids, mask)
            features = model.slot_features(full_ids, full_mask, cls_only=False)
            weights = full_mask[..., None].float()
            return model.classifier((features * weights).sum(1) / weights.sum(1))

        rates[(name, "cls")] = texts_per_s(lambda model=model: model(ids, mask), len(ids))
        rates[(name, "pooled")] = texts_per_s(pooled, len(ids))
    base = rates[("sst2-bert", "cls")]
    for key, rate in rates.items():
        print(key, round(rate, 1), f"{rate / base:.2f}x")


if __name__ == "__main__":
    main()
