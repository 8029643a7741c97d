"""Stage 3 on a CUDA GPU (skipped without one): PPO with the LoRA critic on the tiny Llama trains, starts at KL 0,
and holds less GPU memory than trl's full critic, measured in the same run (CUDA's peak allocated bytes).

    .venv/bin/python -m pytest -m gpu      # on a machine with a GPU
"""

import gc

import pytest
import torch

from refine_af_utils.params import params_from_dict
from refine_af_utils.stages.rl_training import train_generator
from test_rl_training import tiny_rl_params, tiny_run  # noqa: F401 (tiny_run is a fixture used below)

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _cuda_params(tiny_llama_dir, critic: str) -> dict:
    params = tiny_rl_params(tiny_llama_dir, critic=critic)
    params["model"] |= {"device": "cuda", "dtype": "bfloat16"}
    for name in ("reward_model", "understandability", "naturalness", "coherence"):
        params["reward"][name]["device"] = "cuda"
    return params


def test_ppo_with_the_lora_critic_trains_on_a_gpu_in_less_memory_than_the_full_critic(tmp_path, tiny_llama_dir,
                                                                                      tiny_run):  # noqa: F811
    import shutil

    peaks = {}
    for critic in ("full", "lora"):
        run_dir = tmp_path / critic
        shutil.copytree(tiny_run, run_dir)
        gc.collect()  # the previous critic's run leaves nothing allocated that would count in this one's peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        metrics, adapter_dir = train_generator(params_from_dict(_cuda_params(tiny_llama_dir, critic)), run_dir)
        peaks[critic] = torch.cuda.max_memory_allocated()
        assert list(metrics["update"]) == [1, 2] and (adapter_dir / "adapter_config.json").is_file()
        assert metrics["kl"].iloc[0] == pytest.approx(0.0, abs=1e-3)
    assert peaks["lora"] < peaks["full"], peaks
