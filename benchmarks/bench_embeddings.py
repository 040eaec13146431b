"""Embedding throughput, sentences/s at batch 64: glmstack's SentenceEmbedder against sentence-transformers'
SentenceTransformer.encode on the same model, in the same process, on the same sentences.

    python benchmarks/bench_embeddings.py [--model FOLDER] [--sentences 512] [--repeats 5] [--threads 2]

The sentences are generated (seeded): English (3 to 120 words) and Chinese (3 to 120 characters), so batches
pad the way real mixed input does. Runs alternate between the two (which one goes first alternates too), so a
machine whose load changes during the run slows both alike; the ratio is of the medians. Before timing, both
must agree: every vector within 1e-4 (max abs difference) of sentence-transformers'.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from glmstack.engine.embeddings import bundled_embedding_model_dir, load_embedder

BATCH_SIZE = 64
ENGLISH = ("the model reads a long document about retrieval and answers questions from the knowledge base "
           "while the server streams tokens to many clients over HTTP with low latency and keeps usage "
           "records in the database every day of the week for each key and model").split()
CHINESE = list("知识库检索增强生成模型在本地服务器上运行并回答用户的问题文件上传后自动切分成段落向量写入数据库")


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    made = []
    for i in range(count):
        length = int(rng.triangular(3, 120, 12))
        if i % 2:
            made.append("".join(rng.choice(CHINESE) for _ in range(length)) + "。")
        else:
            made.append(" ".join(rng.choice(ENGLISH) for _ in range(length)).capitalize() + ".")
    return made


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a sentence-transformers folder (default: bundled)")
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer  # after HF_HUB_OFFLINE: never reach the hub

    folder = args.model or bundled_embedding_model_dir()
    ours = load_embedder(folder)
    ours.batch_size = BATCH_SIZE
    theirs = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    texts = sentences(args.sentences)

    def run_ours() -> torch.Tensor:
        return torch.tensor(ours.embed(texts).vectors)

    def run_theirs() -> torch.Tensor:
        return theirs.encode(texts, batch_size=BATCH_SIZE, convert_to_tensor=True, normalize_embeddings=True)

    difference = (run_ours() - run_theirs()).abs().max().item()  # also the warm-up of both
    assert difference < 1e-4, f"the embedders disagree: max abs difference {difference}"
    times: dict[str, list[float]] = {"glmstack": [], "sentence-transformers": []}
    for repeat in range(args.repeats):
        pair = [("glmstack", run_ours), ("sentence-transformers", run_theirs)]
        for name, run in pair if repeat % 2 == 0 else reversed(pair):
            times[name].append(timed(run))
    print(f"{ours.info().name}: {len(texts)} sentences (English + Chinese), batch {BATCH_SIZE}, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats, "
          f"max abs difference {difference:.1e}, load average {os.getloadavg()[0]:.2f}")
    for name, seconds in times.items():
        print(f"  {name:22s} {len(texts) / statistics.median(seconds):8.1f} sentences/s "
              f"(median of {', '.join(f'{s:.2f}' for s in seconds)} s)")
    ratio = statistics.median(times["sentence-transformers"]) / statistics.median(times["glmstack"])
    print(f"  ratio glmstack / sentence-transformers: {ratio:.2f}x")


if __name__ == "__main__":
    main()
