"""The pipeline's stages, one module each, named as their notebook and their run folder.

Every stage module exposes ``run(params, run_dir)``, which returns a
:class:`~refine_af_utils.run_folder.StageResult`, and finds its folder, files, config check, metrics and
seeds through :func:`~refine_af_utils.run_folder.open_stage`. The registry (ids, order, params sections)
is :data:`refine_af_utils.layout.STAGES`; no stage module imports another (tests/test_structure.py).
How to add one: docs/adding-a-stage.md.
"""
