#!/usr/bin/env python3
"""The client of seed 000's FastAPI + sentence-transformers embedding service,
unchanged, against berth-embedding: the same JSON on the same port (8891).

Usage: python3 examples/embedding/seed_client.py [http://127.0.0.1:8891]
Standard library only.
"""
import json
import sys
import urllib.request

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8891"

with urllib.request.urlopen(f"{base}/health") as r:
    print("health:", json.load(r))  # {"status": "healthy", "model": "all-MiniLM-L6-v2"}

texts = ["The cat sits on the mat.", "A dog plays in the park."]
request = urllib.request.Request(f"{base}/embed", data=json.dumps(texts).encode(),
                                 headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request) as r:
    embeddings = json.load(r)["embeddings"]
print(f"{len(embeddings)} vectors of {len(embeddings[0])} floats;",
      "cosine:", round(sum(a * b for a, b in zip(*embeddings)), 4))
