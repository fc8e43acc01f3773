#!/usr/bin/env python3
"""Check model.onnx + mean pooling + L2 normalisation against sentence-transformers' vectors.

Tokenises the way fastembed does (tokenizer.json, truncation to max_seq_length, padding to the
longest text of the batch), runs the graph with ONNX Runtime's Python API, mean-pools the
`last_hidden_state` with the attention mask, L2-normalises, and compares each vector with the
fixture (made by make_reference_vectors.py with sentence-transformers itself).

Runs every text alone and all texts in one padded batch. Exits 1 when any cosine is below
--min-cosine. Needs: numpy, onnxruntime, tokenizers.

Usage: verify_onnx.py --model-dir DIR --fixture reference_vectors.json [--min-cosine 0.99999]
"""

import argparse
import json
import sys

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def embed(session, tokenizer, texts):
    enc = tokenizer.encode_batch(texts, add_special_tokens=True)
    feeds = {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }
    (hidden,) = session.run(["last_hidden_state"], feeds)
    mask = feeds["attention_mask"][:, :, None].astype(np.float32)
    pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
    norm = np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled / np.clip(norm, 1e-12, None), [sum(e.attention_mask) for e in enc]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--fixture", required=True)
    ap.add_argument("--min-cosine", type=float, default=0.99999)
    args = ap.parse_args()

    with open(args.fixture, encoding="utf-8") as f:
        fixture = json.load(f)
    max_len = int(fixture["max_seq_length"])
    texts = [it["text"] for it in fixture["items"]]
    ref = np.array([it["vector"] for it in fixture["items"]], dtype=np.float64)

    tokenizer = Tokenizer.from_file(f"{args.model_dir}/tokenizer.json")
    tokenizer.enable_truncation(max_length=max_len)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest of the batch

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(f"{args.model_dir}/model.onnx", opts, providers=["CPUExecutionProvider"])
    print("onnxruntime", ort.__version__,
          "inputs", [(i.name, i.type, i.shape) for i in session.get_inputs()],
          "outputs", [(o.name, o.type, o.shape) for o in session.get_outputs()])

    batch, lengths = embed(session, tokenizer, texts)
    single = np.concatenate([embed(session, tokenizer, [t])[0] for t in texts])

    worst = 1.0
    for name, got in (("batched", batch), ("one by one", single)):
        cos = (got * ref).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        diff = np.abs(got - ref).max(axis=1)
        i = int(np.argmin(cos))
        print(f"{name:>10}: min cosine {cos.min():.9f} (item {i}, {lengths[i]} tokens), "
              f"max |diff| {diff.max():.2e}, norms {np.linalg.norm(got, axis=1).min():.6f}..{np.linalg.norm(got, axis=1).max():.6f}")
        worst = min(worst, float(cos.min()))
    if worst < args.min_cosine:
        for i, (t, c) in enumerate(zip(texts, (batch * ref).sum(axis=1))):
            print(f"  item {i:2d} cos {c:.9f} tokens {lengths[i]:3d} text {t[:40]!r}")
        print(f"FAIL: min cosine {worst:.9f} < {args.min_cosine}")
        return 1
    print(f"OK: {len(texts)} texts, min cosine {worst:.9f} >= {args.min_cosine}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
