"""Per-stage fingerprints: a change reruns its stage and the later ones, never the earlier ones."""

import dataclasses

from refine_af_utils.params import Params, load_params
from refine_af_utils.layout import STAGES, stage_fingerprint

from conftest import REPO_ROOT


def _unchanged(a, b) -> list[str]:
    return [s.id for s in STAGES if stage_fingerprint(s, a) == stage_fingerprint(s, b)]


def test_an_evaluation_change_reruns_only_stage_6_and_the_report():
    base = load_params(REPO_ROOT / "params" / "default.yaml")
    changed = load_params(REPO_ROOT / "params" / "default.yaml", overrides={"evaluation.max_new_tokens": 64})
    assert _unchanged(base, changed) == ["00", "01", "02", "03", "04", "05"]


def test_an_rl_change_keeps_stages_0_to_2_and_a_seed_change_reruns_from_stage_1():
    base = load_params(REPO_ROOT / "params" / "default.yaml")
    rl = load_params(REPO_ROOT / "params" / "default.yaml", overrides={"rl.kl_coef": 0.2})
    assert _unchanged(base, rl) == ["00", "01", "02"]
    seed = load_params(REPO_ROOT / "params" / "default.yaml", overrides={"random_seed": 7})
    assert _unchanged(base, seed) == ["00"]


def test_every_params_key_but_the_run_name_belongs_to_a_stage():
    declared = {section for stage in STAGES for section in stage.sections}
    assert {f.name for f in dataclasses.fields(Params)} - declared == {"run_name"}
