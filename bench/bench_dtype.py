"""Which dtype should ``auto`` pick on this CPU? float32 against bfloat16, measured in the same run.

Stage 1's own work on the embedded SmolLM2-135M-Instruct: the same Self-Instruct prompts decoded in both
dtypes, alternating rounds (so a busy neighbour slows both alike), plus one forward pass (prefill) of the
batch. Writes ``results/bench/dtype_<cpu kind>.json`` with the CPU kind, the tokens/s of each dtype and
the ratio bfloat16 / float32 (above 1: bfloat16 is faster here).

    python bench/bench_dtype.py [--prompts 8] [--new-tokens 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from refine_af_utils.environment import cpu_kind, cpu_model
from refine_af_utils.generation import generate_batch
from refine_af_utils.models import load_causal_lm
from refine_af_utils.params import ModelParams
from refine_af_utils.prompts import instruction_generation_prompt
from refine_af_utils.seeding import derive_seed
from refine_af_utils.seeds import load_seed_tasks


def prompts(count: int) -> list[str]:
    """Stage 1 prompts with 8 seed instructions each, as the default run writes them."""
    instructions = [t.instruction for t in load_seed_tasks("bundled")]
    rng = random.Random(0)
    return [instruction_generation_prompt(rng.sample(instructions, 8)) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    batch = prompts(args.prompts)
    models = {name: load_causal_lm(ModelParams(dtype=name)) for name in ("float32", "bfloat16")}
    seconds = {name: 0.0 for name in models}
    tokens = {name: 0 for name in models}
    prefill = {name: 0.0 for name in models}
    for round_number in range(args.rounds):
        for name, (model, tokenizer) in models.items():
            encoded = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
            start = time.perf_counter()
            with torch.no_grad():
                model(**encoded)
            prefill[name] += time.perf_counter() - start
            torch.manual_seed(derive_seed(0, "bench_dtype", round_number))
            start = time.perf_counter()
            outputs = generate_batch(model, tokenizer, batch, max_new_tokens=args.new_tokens, temperature=0.7,
                                     top_p=0.5)
            seconds[name] += time.perf_counter() - start
            tokens[name] += sum(o.num_tokens for o in outputs)
    result = {
        "cpu_model": cpu_model(), "cpu_kind": cpu_kind(), "torch_threads": torch.get_num_threads(),
        "prompts": args.prompts, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "prompt_tokens": int(encoded["attention_mask"].sum()),
        "tokens_per_second": {name: tokens[name] / seconds[name] for name in models},
        "prefill_seconds": {name: prefill[name] / args.rounds for name in models},
        "bfloat16_over_float32_speed": (tokens["bfloat16"] / seconds["bfloat16"]) / (tokens["float32"] / seconds["float32"]),
        "bfloat16_over_float32_prefill_speed": prefill["float32"] / prefill["bfloat16"],
    }
    out = Path(args.out or f"results/bench/dtype_{result['cpu_kind']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
