"""Shared fixtures of the recipe tests: a tiny random model (saved once) and tiny run overrides."""

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # makes `smooth_reward:...` importable as a dotted-path reward
    sys.path.insert(0, str(HERE))

from testkit import save_tiny_random_model

MODEL = ["model.d_text=32", "model.text_layers=1", "model.text_heads=2", "model.unet_channels=[8,16,16]",
         "model.image_size=16"]
# 2 prompts x 4 trajectories, 2 minibatches of 4, micro-batches of 2, 4 denoising steps (window 2).
SIZES = ["steps=2", "algo.prompts_per_step=2", "algo.group_size=4", "algo.trajectories_per_minibatch=4",
         "algo.micro_batch_trajectories=2", "sampler.num_steps=4", "sampler.window_range=[0,3]",
         "sampler.window_size=2", "sampler.eval_num_steps=2", "eval.num_prompts=2", "eval.grid_prompts=2",
         "text.max_reasoning_tokens=6", "task.prompt_pool=64", "threads=1",
         "rewards=[{name: 'smooth_reward:brightness', weight: 1.0}]"]
# Large steps so that two steps visibly move the parameters (and the MSE has a gradient).
LEARN = ["optim.lr_text=1e-3", "optim.lr_image=1e-3", "algo.image_eps=1e-2", "algo.c_mse=0.1"]
RUN = SIZES + LEARN


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """The tiny random model of ``MODEL``, every weight non-zero, saved like a real checkpoint."""
    return save_tiny_random_model(MODEL, tmp_path_factory.mktemp("model") / "tiny.safetensors")


def tiny_overrides(checkpoint: str, out_dir, *extra: str) -> list[str]:
    return [*MODEL, *RUN, f"model.checkpoint={checkpoint}", f"output_dir={out_dir}", *extra]
