"""Embeddings: the engine (engine/pooling.py, what /v1/embeddings runs) vs HF transformers'
batched forward, side by side in one process, on the same texts.

    python bench/embeddings.py [--model smollm2-135m-instruct] [--texts 256] [--batch 16]

Texts of 16 to 512 tokens (seeded random lengths, words from a fixed list), bf16, last-token
pooling, L2-normalized. The baseline is what sentence-transformers' encode does: texts
sorted by length, batches of --batch, right-padded to the longest, one forward of AutoModel,
the last real token's state. The engine takes all texts at once: chunked prefill with no padding,
its own kernels. Prints texts/s for both, the ratio, and the smallest cosine similarity
between the two vectors of a text.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from transformers import AutoModel

from loragate.engine import EngineConfig, LLMEngine, SamplingParams
from loragate.engine.models.prepare import DEFAULT_MODEL, resolve_model

WORDS = ("the cache keeps every block of the prompt until a later request with the same prefix reuses it "
         "while adapters load into slots next to the shared base model and each tenant sees only its own").split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 400))) for _ in range(n)]


def engine_vectors(engine: LLMEngine, prompts: list[list[int]]) -> torch.Tensor:
    params = SamplingParams(max_tokens=1, pooling="last")
    reqs = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.embedding
    vectors = torch.tensor([done[r.request_id] for r in reqs])
    return vectors / vectors.norm(dim=1, keepdim=True)


@torch.inference_mode()
def hf_vectors(model, prompts: list[list[int]], batch: int) -> torch.Tensor:
    """Batches of texts of similar length (sorted first, as sentence-transformers' encode does,
    so little is padding), in the original order at the end."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = []
    for i in range(0, len(order), batch):
        chunk = [prompts[j] for j in order[i:i + batch]]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, :len(p)], mask[row, :len(p)] = torch.tensor(p), 1
        states = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out.append(states[torch.arange(len(chunk)), mask.sum(1) - 1].float())
    vectors = torch.empty(len(prompts), out[0].shape[1])
    vectors[order] = torch.cat(out)
    return vectors / vectors.norm(dim=1, keepdim=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=args.model, dtype="bfloat16", enable_prefix_caching=False))
    hf = AutoModel.from_pretrained(resolve_model(args.model, progress=False), dtype=torch.bfloat16).eval()
    prompts = [engine.tokenizer.encode(t) for t in texts(args.texts)]
    tokens = sum(map(len, prompts))
    engine_vectors(engine, prompts[:8])  # warm-up, both
    hf_vectors(hf, prompts[:8], args.batch)
    t0 = time.perf_counter()
    ours = engine_vectors(engine, prompts)
    t1 = time.perf_counter()
    theirs = hf_vectors(hf, prompts, args.batch)
    t2 = time.perf_counter()
    cosine = (ours * theirs).sum(1)
    print(f"{args.texts} texts, {tokens} tokens (mean {tokens / args.texts:.0f})")
    print(f"loragate engine     : {args.texts / (t1 - t0):7.1f} texts/s ({tokens / (t1 - t0):.0f} tok/s)")
    print(f"HF batched forward  : {args.texts / (t2 - t1):7.1f} texts/s ({tokens / (t2 - t1):.0f} tok/s), "
          f"batches of {args.batch}")
    print(f"ratio {(t2 - t1) / (t1 - t0):.2f}x; cosine between the two vectors of a text: min {cosine.min():.4f}, "
          f"mean {cosine.mean():.4f}")


if __name__ == "__main__":
    main()
