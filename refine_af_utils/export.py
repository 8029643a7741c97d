"""Both arms' datasets as Hugging Face dataset folders, each with a dataset card.

    python -m refine_af_utils.export results/default [--output DIR]

Writes ``<run_dir>/datasets/<arm>/`` (or ``DIR/<arm>/``): ``data/train.jsonl`` (instruction, input, output,
the Eq. 1 reward and its components) and ``README.md``, a card whose YAML header ``datasets.load_dataset``
reads (``load_dataset("results/default/datasets/refine_af")``) and whose body says where the data came from:
the run, its params, the generator, counts, mean reward and the seed tasks' licence. Only a run whose stage 4
is complete (its marker is there and its outputs unchanged) is exported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from refine_af_utils.errors import RefineAFError, UpstreamNotReadyError
from refine_af_utils.files import atomic_write_text, read_jsonl
from refine_af_utils.layout import ARMS, EXPORT_CARD, EXPORT_DATA, RESOLVED_PARAMS, STAGE, RunLayout
from refine_af_utils.params import Params, load_params

COLUMNS = ("instruction", "input", "output", "reward", "reward_model", "understandability", "naturalness",
           "coherence", "is_classification", "instruction_id")
ARM_TEXT = {
    "self_instruct": "the Self-Instruct baseline: instances written by the untrained generator (the backbone as is)",
    "refine_af": "REFINE-AF: instances written by the generator after stage 3's RL on the automated-feedback reward",
}
SEED_LICENCE = {"bundled": "Apache-2.0 (36 seed tasks written for this project, shipped with refine-af)"}


def _card(arm: str, params: Params, rows: list[dict[str, Any]], run_dir: Path) -> str:
    rewards = [float(r["reward"]) for r in rows if r.get("reward") is not None]
    header = {
        "license": "other",
        "language": ["en"],
        "task_categories": ["text-generation"],
        "pretty_name": f"refine-af {arm} ({params.run_name})",
        "size_categories": ["n<1K" if len(rows) < 1000 else "1K<n<10K" if len(rows) < 10_000 else "10K<n<100K"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": EXPORT_DATA}]}],
    }
    seed_licence = SEED_LICENCE.get(params.seed_tasks, "that of the seed file named above (check it before sharing)")
    lines = [
        "---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
        f"# refine-af: {arm} instances of run `{params.run_name}`", "",
        f"{ARM_TEXT[arm][0].upper()}{ARM_TEXT[arm][1:]}. Made by refine-af's stage 4 (instance generation) in "
        f"the run folder `{run_dir.name}`; its `{RESOLVED_PARAMS}` holds every setting of the run.", "",
        "## Provenance", "",
        f"- generator backbone: `{params.model.name_or_path}` ({params.model.dtype})",
        f"- instructions: stage 1, {params.num_instructions} asked for, from seed tasks `{params.seed_tasks}`",
        f"- RL algorithm (REFINE-AF arm): {params.rl.algorithm}, {params.rl.updates} updates",
        f"- random seed: {params.random_seed}",
        f"- seed tasks' licence: {seed_licence}; the generated text follows the generator's licence",
        "", "## Contents", "",
        f"- {len(rows)} instances of {len({r['instruction_id'] for r in rows})} instructions",
        f"- mean Eq. 1 reward: {sum(rewards) / len(rewards):.4f}" if rewards else "- no reward recorded",
        "- columns: " + ", ".join(f"`{c}`" for c in COLUMNS), "",
        "A research artefact: small, machine-written and unreviewed; see the run's `report.md` for what it shows.", "",
    ]
    return "\n".join(lines)


def export_datasets(run_dir: str | Path, output: Optional[str | Path] = None) -> dict[str, Path]:
    """Write both arms of ``run_dir`` as Hugging Face dataset folders; ``{arm: folder}``."""
    from refine_af_utils.run_folder import stage_status

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    params_file = run_dir / RESOLVED_PARAMS
    if not params_file.is_file():
        raise UpstreamNotReadyError(f"{run_dir}: not a run folder (no params.yaml); run the pipeline first")
    params = load_params(params_file)
    status = stage_status(run_dir, STAGE["04"], params)
    if status.run:
        raise UpstreamNotReadyError(f"{run_dir}: stage 04 is not complete ({status.reason}); run it first: "
                                    f"python -m refine_af_utils.run {params_file} --until 04")
    folders = {}
    for arm in ARMS:
        rows = [{c: row.get(c) for c in COLUMNS} for row in read_jsonl(layout.arm_data(arm))]
        folder = Path(output) / arm if output else layout.exported_dataset(arm)
        (folder / EXPORT_DATA).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / EXPORT_DATA, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        atomic_write_text(folder / EXPORT_CARD, _card(arm, params, rows, run_dir))
        folders[arm] = folder
    return folders


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m refine_af_utils.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run folder whose stage 4 is complete, e.g. results/default")
    parser.add_argument("--output", help="write DIR/<arm>/ instead of <run_dir>/datasets/<arm>/")
    args = parser.parse_args(argv)
    try:
        folders = export_datasets(args.run_dir, args.output)
    except RefineAFError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for arm, folder in folders.items():
        print(f"{arm}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
