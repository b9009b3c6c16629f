"""benchmarks/closed_loop_bound.py: the bound over schedules of engine layouts is the optimum of
its linear program, checked against a search over every split of the time."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("closed_loop_bound", Path(__file__).resolve().parents[1] / "benchmarks" / "closed_loop_bound.py")
closed_loop_bound = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(closed_loop_bound)


STEPS = 90  # a multiple of 3: thirds of the time lie on the grid


def layout(instances: int, threads: int, rate: float) -> dict:
    return {"instances": instances, "threads": threads, "forward_texts_per_s": rate}


def searched(layouts: list[dict], cores: int, path_ms: float, steps: int) -> float:
    """The best served rate over time shares on a grid (at most three layouts at once, idle
    time allowed) that keep within the time and the cores."""
    best = 0.0
    for chosen in itertools.combinations(range(len(layouts)), min(3, len(layouts))):
        for split in itertools.product(range(steps + 1), repeat=len(chosen)):
            if sum(split) > steps:
                continue
            shares = [s / steps for s in split]
            rates = [layouts[i]["forward_texts_per_s"] for i in chosen]
            cpu = sum(x * (layouts[i]["instances"] * layouts[i]["threads"] + path_ms / 1000 * r) for x, i, r in zip(shares, chosen, rates, strict=True))
            if cpu <= cores + 1e-9:
                best = max(best, sum(x * r for x, r in zip(shares, rates, strict=True)))
    return best


@pytest.mark.parametrize(
    ("layouts", "cores", "path_ms"),
    [
        # sst2-mux5 on 2 cores: one layout alone never reaches the mix of a 1-thread and a 2-thread one
        ([layout(1, 1, 2436), layout(1, 2, 3169), layout(2, 1, 3070)], 2, 0.142),
        # a request path that costs nothing: the fastest layout all the time
        ([layout(1, 1, 2436), layout(1, 2, 3169), layout(2, 1, 3070)], 2, 0.0),
        # a slow single layout that the cores cannot keep busy: part of the time idle
        ([layout(1, 2, 1000)], 2, 1.0),
    ],
)
def test_the_bound_is_the_best_schedule_of_layouts(layouts: list[dict], cores: int, path_ms: float) -> None:
    got = closed_loop_bound.bound(layouts, cores, path_ms)
    grid = searched(layouts, cores, path_ms, STEPS)
    # no feasible split of the time serves more; the grid's best is within one step of it
    assert grid - 1e-6 <= got["per_s"] <= grid + max(x["forward_texts_per_s"] for x in layouts) * 2 / STEPS
    assert sum(s["share"] for s in got["shares"]) <= 1 + 1e-9
    used = sum(s["share"] * (s["instances"] * s["threads"] + path_ms / 1000 * next(x["forward_texts_per_s"] for x in layouts if (x["instances"], x["threads"]) == (s["instances"], s["threads"]))) for s in got["shares"])
    assert used <= cores + 1e-9


def test_the_bound_mixes_layouts_where_the_cores_allow() -> None:
    """With sst2-mux5's measured rates the optimum runs the 1-thread layout part of the time,
    where the single best layout alone would stop at the cores' limit."""
    layouts = [layout(1, 1, 2436), layout(1, 2, 3169), layout(2, 1, 3070)]
    got = closed_loop_bound.bound(layouts, 2, 0.142)
    alone = max(min(x["forward_texts_per_s"], 2 / (x["instances"] * x["threads"] / x["forward_texts_per_s"] + 0.142e-3)) for x in layouts)
    assert got["per_s"] > alone
    assert len(got["shares"]) == 2
