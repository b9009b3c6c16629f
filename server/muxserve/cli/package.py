"""``muxserve package``: put a trained model into the model repository."""

from __future__ import annotations

import argparse
import json

NAME = "package"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="copy a trained model (fp16) into the model repository with a config.pbtxt")
    p.add_argument("source", help="a saved model folder (e.g. runs/sst2-mux2/best)")
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--name", required=True)
    p.add_argument("--version", type=int, default=1)
    p.add_argument("--baseline", default="", help="the plain model this one is compared to")
    p.add_argument("--batch-texts", type=int, default=0, help="texts per forward pass (default 32 groups)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--shadow-sample-rate", type=float, default=0.0)
    p.add_argument("--labels", help="comma-separated class names, replacing the model's (same count), e.g. negative,positive")
    p.add_argument("--short-group-policy", help="copy or pad: how a group of fewer than N texts is completed (default: the model's)")
    p.add_argument("--mask-group-padding", choices=["on", "off"], help="mux model: hide from the encoder the positions no text of a group fills (default: the model's)")


def run(a: argparse.Namespace) -> int:
    from muxserve.model.packaging import package_model

    target = package_model(a.source, a.model_repository, a.name, a.version, a.baseline, batch_texts=a.batch_texts, max_queue_delay_us=a.max_queue_delay_us, shadow_sample_rate=a.shadow_sample_rate, labels=a.labels.split(",") if a.labels else None, short_group_policy=a.short_group_policy, mask_group_padding=None if a.mask_group_padding is None else a.mask_group_padding == "on")
    print(json.dumps({"model": a.name, "version": a.version, "path": str(target)}))
    return 0
