"""``python -m refine_af_utils.study SPEC.yaml [--launcher local|slurm|submitit-local] [--dry-run]``."""

import sys

from refine_af_utils.study.launch import main

sys.exit(main())
