"""Studies: one params file over a grid of settings and seeds, each run through the same runner.

    python -m refine_af_utils.study params/studies/reward_ablation.yaml [--launcher local|slurm] [--dry-run]

A spec (YAML) names a base params file, seeds and a grid of settings::

    name: reward_ablation            # optional: the spec file's stem
    params: ../default.yaml          # relative to the spec file
    seeds: [42, 43, 44]
    until: "07"                      # optional: the last stage to run (default "07")
    grid:
      - name: paper
        set: {}                      # dotted --set overrides (the runner's)
      - name: und-plus
        set: {reward.understandability.weight: 0.4421}
      - name: mistral
        params: ../recipes/mistral-7b/paper.yaml   # optional: this setting's own params file
    slurm: {timeout_min: 4320, gpus_per_node: 1}   # optional: submitit parameters (--launcher slurm)
    reuse_from: [reward_ablation]    # optional: other studies (same results root) whose runs may donate stages

Each run (setting x seed) is ``results/<study>/<setting>-seed<N>/``, made by
:func:`refine_af_utils.run.run_pipeline` with ``run_name`` and ``random_seed`` set. Before a run
starts, every stage it shares with another run of the study (equal :func:`~refine_af_utils.run.stage_fingerprint`,
the other run's stage complete) is copied from that run instead of being run again: the stage's
folder, its metrics, its executed notebook and, last, its marker, each through a temporary name and
a rename, so a copy cut off by a kill never looks complete. The runner then finds those stages
complete (their markers record the same params, outputs and inputs) and runs the rest. A complete
run is skipped; a rerun of a killed study continues it. ``results/<study>/study.md`` (with CSV
tables and PNG figures beside it) summarises the runs that exist.

The modules: :mod:`~refine_af_utils.study.spec` (the spec), :mod:`~refine_af_utils.study.reuse` (stages
copied between runs), :mod:`~refine_af_utils.study.launch` (running the runs; the command line) and
:mod:`~refine_af_utils.study.report` (``study.md``).
"""

from refine_af_utils.study.launch import (
    CHEAP_STAGES,
    DEFAULT_TIMEOUT_MIN,
    LAUNCHERS,
    donor_plan,
    dry_run,
    main,
    run_one,
    run_study,
)
from refine_af_utils.study.report import (
    COMPONENTS,
    HEADLINES,
    aa_control,
    heldout_contrast,
    placebo_contrast,
    placebo_pairs,
    run_headlines,
    self_instruct_per_task,
    study_tables,
    write_study_report,
)
from refine_af_utils.study.reuse import (
    STUDY_FILE,
    TMP_DIR,
    copy_stage,
    is_locked,
    reuse_stages,
    reused_stages,
    run_is_complete,
)
from refine_af_utils.study.spec import Setting, StudyRun, StudySpec, StudySpecError, load_spec, study_dir_of

__all__ = [
    "CHEAP_STAGES", "COMPONENTS", "DEFAULT_TIMEOUT_MIN", "HEADLINES", "LAUNCHERS", "STUDY_FILE", "TMP_DIR",
    "Setting", "StudyRun", "StudySpec", "StudySpecError", "aa_control", "copy_stage", "donor_plan", "dry_run",
    "heldout_contrast", "is_locked", "load_spec", "main", "placebo_contrast", "placebo_pairs", "reuse_stages", "reused_stages", "run_headlines", "run_is_complete", "run_one",
    "run_study", "self_instruct_per_task", "study_dir_of", "study_tables", "write_study_report",
]
