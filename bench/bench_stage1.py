"""Stage 1 benchmarks, each against a baseline measured in the same run (ratios, not timings alone).

1. Novelty check: one candidate against pools of 1,000 / 5,000 / 15,000 instructions,
   ours (refine_af_utils.rouge.NoveltyPool) vs rouge-score's RougeScorer, same decisions.
2. Generation: tokens/s of batched decoding vs one prompt at a time (what Self-Instruct-style
   loops do), same model, same prompts, same number of new tokens.

    python bench/bench_stage1.py [--out results/bench/stage1.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
from rouge_score import rouge_scorer
from tqdm import tqdm

from refine_af_utils.generation import generate_batch
from refine_af_utils.models import load_causal_lm, torch_dtype
from refine_af_utils.params import ModelParams
from refine_af_utils.prompts import instruction_generation_prompt
from refine_af_utils.rouge import NoveltyPool
from refine_af_utils.seeds import load_seed_tasks


def synthetic_pool(size: int, rng: random.Random) -> list[str]:
    """Instruction-like strings: seed instructions with words shuffled, dropped and recombined."""
    words = [w for t in load_seed_tasks("bundled") for w in t.instruction.split()]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 30))) for _ in range(size)]


def bench_novelty(sizes: list[int], candidates: int, rng: random.Random) -> list[dict]:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    results = []
    for size in sizes:
        pool_texts = synthetic_pool(size, rng)
        queries = [pool_texts[rng.randrange(size)] + " extra words" for _ in range(candidates // 2)]
        queries += synthetic_pool(candidates - len(queries), rng)
        pool = NoveltyPool(pool_texts)  # tokenising the pool is a one-off cost, as in stage 1
        start = time.perf_counter()
        ours = [pool.scores(q) for q in queries]
        ours_seconds = (time.perf_counter() - start) / len(queries)
        start = time.perf_counter()
        theirs = [np.array([scorer.score(p, q)["rougeL"].fmeasure for p in pool_texts])
                  for q in tqdm(queries, desc=f"rouge-score, pool {size}")]
        theirs_seconds = (time.perf_counter() - start) / len(queries)
        same_scores = all(np.array_equal(a, b) for a, b in zip(ours, theirs))
        same_decisions = all(((a > 0.7).any() == (b > 0.7).any()) for a, b in zip(ours, theirs))
        results.append({
            "pool_size": size, "candidates": len(queries),
            "ours_seconds_per_candidate": ours_seconds, "rouge_score_seconds_per_candidate": theirs_seconds,
            "speedup": theirs_seconds / ours_seconds, "identical_scores": same_scores,
            "identical_decisions": same_decisions,
        })
        print(results[-1])
    return results


def bench_generation(prompts_count: int, new_tokens: int, rng: random.Random) -> dict:
    spec = ModelParams()
    model, tokenizer = load_causal_lm(spec)
    seeds = [t.instruction for t in load_seed_tasks("bundled")]
    prompts = [instruction_generation_prompt(rng.sample(seeds, 8)) for _ in range(prompts_count)]
    # Fixed-length continuations (no stop strings, greedy) so both sides make the same number of tokens.
    generate_batch(model, tokenizer, prompts[:2], max_new_tokens=4)  # warm-up
    start = time.perf_counter()
    batched = generate_batch(model, tokenizer, prompts, max_new_tokens=new_tokens)
    batched_seconds = time.perf_counter() - start
    start = time.perf_counter()
    single = [generate_batch(model, tokenizer, [p], max_new_tokens=new_tokens)[0]
              for p in tqdm(prompts, desc="one prompt at a time")]
    single_seconds = time.perf_counter() - start
    batched_tokens = sum(g.num_tokens for g in batched)
    single_tokens = sum(g.num_tokens for g in single)
    return {
        "model": spec.name_or_path, "dtype": str(torch_dtype(spec.dtype, spec.device)),
        "prompts": prompts_count, "max_new_tokens": new_tokens,
        "batched_tokens": batched_tokens, "batched_seconds": batched_seconds,
        "batched_tokens_per_second": batched_tokens / batched_seconds,
        "single_tokens": single_tokens, "single_seconds": single_seconds,
        "single_tokens_per_second": single_tokens / single_seconds,
        "speedup": (batched_tokens / batched_seconds) / (single_tokens / single_seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/bench/stage1.json")
    parser.add_argument("--pool-sizes", default="1000,5000,15000")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=32)  # stage 1 default batch
    parser.add_argument("--new-tokens", type=int, default=160)  # stage 1 default
    args = parser.parse_args()
    rng = random.Random(0)
    torch.manual_seed(0)
    report = {
        "machine": {"processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()},
        "novelty": bench_novelty([int(s) for s in args.pool_sizes.split(",")], args.candidates, rng),
        "generation": bench_generation(args.prompts, args.new_tokens, rng),
    }
    print(json.dumps(report["generation"], indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
