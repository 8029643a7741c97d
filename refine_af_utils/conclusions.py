"""Each stage notebook's closing paragraph, computed from the numbers the stage recorded (``metrics/<id>.json``).

Nothing here is hard-coded prose about a result: a sentence says what the run's own numbers and intervals
show, and an interval that includes 0 is said to be "not distinguishable from 0".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from refine_af_utils.run_folder import read_metrics
from refine_af_utils.trl_bridge import logged_kl_unit


def _n(value: Any) -> str:
    """A count as an integer, a score to 4 significant digits."""
    value = float(value)
    return f"{value:.0f}" if value.is_integer() else f"{value:.4g}"


def _share(part: Any, whole: Any) -> str:
    return f"{100 * float(part) / float(whole):.0f}%" if float(whole) else "n/a"


def _p(value: Any) -> str:
    """A p-value to 3 significant digits, or why there is none (a sign test over no wins and no losses)."""
    return "undefined (no task was won or lost)" if value is None or value != value else f"{float(value):.3g}"


def interval_verdict(estimate: float, low: float, high: float, unit: str = "") -> str:
    """``+0.0123 [-0.0041, +0.0290]: not distinguishable from 0`` (or ``above 0`` / ``below 0``)."""
    verdict = "above 0" if low > 0 else "below 0" if high < 0 else "not distinguishable from 0"
    return f"{estimate:+.4g}{unit} [{low:+.4g}, {high:+.4g}] (95% CI): {verdict}"


def _seed_tasks(m: dict[str, Any]) -> str:
    return (f"**This run's seeds:** {_n(m['tasks'])} seed tasks, {_n(m['classification tasks'])} of them classification "
            f"({100 * float(m['classification share']):.0f}%), with {_n(m['instances'])} instances "
            f"({_n(m['instances with empty input'])} with an empty input).")


def _instruction_generation(m: dict[str, Any]) -> str:
    return (f"**This run's instructions:** {_n(m['instructions'])} accepted out of {_n(m['count_candidates'])} "
            f"candidates ({_share(m['instructions'], m['count_candidates'])}); {_n(m['count_too_similar'])} were too "
            f"similar to an earlier one (ROUGE-L >= 0.7) and {_n(m['count_not_needed'])} were not needed once the "
            f"target was reached. Classification share {100 * float(m['classification_share']):.0f}%; mean maximum "
            f"ROUGE-L to the earlier instructions {_n(m['mean_max_rouge_l'])}; {_n(m['tokens_per_second'])} tokens/s.")


def _reward_analysis(m: dict[str, Any]) -> str:
    components = ", ".join(f"{key.replace('_', ' ')} {_n(m[f'mean_{key}'])}"
                           for key in ("reward_model", "understandability", "naturalness", "coherence"))
    kept = f"{_n(m['instances'])} instances of {_n(m['instructions'])} instructions"
    return (f"**This run's reward:** {kept} kept out of {_n(m['count_candidates'])} candidates "
            f"({_n(m['count_unparseable'])} unparseable). Mean Eq. 1 reward {_n(m['mean_reward'])}; mean components: "
            f"{components}.")


def _rl_training(m: dict[str, Any]) -> str:
    text = f"**This run's RL:** {_n(m['updates'])} {str(m['algorithm']).upper()} updates."
    if m.get("heldout_reward_gain_ci_low") is not None:
        text += (f" On {_n(m['heldout_instructions'])} held-out instructions, the trained generator moved the reward by "
                 + interval_verdict(m["heldout_reward_gain"], m["heldout_reward_gain_ci_low"],
                                    m["heldout_reward_gain_ci_high"])
                 + "; the parsed share by " + interval_verdict(m["heldout_parsed_gain"], m["heldout_parsed_gain_ci_low"],
                                                             m["heldout_parsed_gain_ci_high"]) + ".")
    if m.get("probe_exploitable") is not None:
        text += (" The reward probe: a degenerate output (the instruction copied, a generic sentence, the input "
                 "plus a period) reached stage 2's mean reward on average, so the reward is exploitable."
                 if m["probe_exploitable"] else " The reward probe: no degenerate output reached stage 2's mean "
                 "reward on average.")
    if m.get("last_kl") is not None:
        first = f"{float(m['first_kl']):.3f} at update 1 (0 where policy and reference agree), " \
            if m.get("first_kl") is not None else ""
        unit = logged_kl_unit(str(m["algorithm"]))
        text += f" KL to the reference: {first}{float(m['last_kl']):.3f} {unit} at the last update."
    return text


def _instance_generation(m: dict[str, Any]) -> str:
    text = (f"**This run's datasets:** Self-Instruct kept {_n(m['self_instruct_instances'])} instances "
            f"({_n(m['self_instruct_instructions_with_instances'])} instructions), REFINE-AF "
            f"{_n(m['refine_af_instances'])} ({_n(m['refine_af_instructions_with_instances'])} instructions).")
    if m.get("reward_all_instructions_ci_low") is not None:
        text += (" REFINE-AF minus Self-Instruct in reward over all instructions (0 where none was kept): "
                 + interval_verdict(m["reward_all_instructions_difference"], m["reward_all_instructions_ci_low"],
                                    m["reward_all_instructions_ci_high"]) + ".")
    return text


def _sft(m: dict[str, Any]) -> str:
    return ("**This run's SFT:** " + "; ".join(
        f"{label} {_n(m[f'{arm}_training_examples'])} examples, {_n(m[f'{arm}_steps'])} steps, loss "
        f"{_n(m[f'{arm}_first_loss'])} -> {_n(m[f'{arm}_last_loss'])}"
        for arm, label in (("self_instruct", "Self-Instruct"), ("refine_af", "REFINE-AF"))) + ".")


def _superni_evaluation(m: dict[str, Any]) -> str:
    low, high = m["refine_af_minus_self_instruct_rougeL_ci"]
    difference = float(m["refine_af_rougeL"]) - float(m["self_instruct_rougeL"])
    return (f"**This run's result:** REFINE-AF beat Self-Instruct on {_n(m['wins'])} of {_n(m['tasks'])} tasks "
            f"({float(m['win_share_percent']):.0f}%, exact 95% CI {100 * float(m['win_share_ci_low']):.0f}-"
            f"{100 * float(m['win_share_ci_high']):.0f}%; the paper: 63-66%), tied on {_n(m['ties'])} and lost "
            f"{_n(m['losses'])}; sign test p = {_p(m.get('sign_test_p'))}. Its own CI excluded 0 on "
            f"{_n(m['significant_wins'])} wins and {_n(m['significant_losses'])} losses. Overall ROUGE-L "
            f"{_n(m['refine_af_rougeL'])} against {_n(m['self_instruct_rougeL'])} (base model {_n(m['base_rougeL'])}), "
            f"a difference of " + interval_verdict(difference, low, high) + ".")


def _report(m: dict[str, Any]) -> str:
    return (f"**This run's report:** {len(m['tables'])} tables and {len(m['figures'])} figures, every number "
            "computed from this run's files.")


CONCLUSIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "00": _seed_tasks, "01": _instruction_generation, "02": _reward_analysis, "03": _rl_training,
    "04": _instance_generation, "05": _sft, "06": _superni_evaluation, "07": _report,
}


def conclusion(stage_id: str, run_dir: str | Path) -> str:
    """The closing paragraph of stage ``stage_id``'s notebook, from the run's ``metrics/<stage_id>.json``."""
    return CONCLUSIONS[stage_id](read_metrics(run_dir, stage_id))
