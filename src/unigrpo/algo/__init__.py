"""The math of UniGRPO as small, pure tensor functions (see docs/algorithm.md).

schedule: time grid; sde: stochastic denoising step + log-prob, SDE window; advantages: group
normalisation; guidance: classifier-free guidance; text_loss: GRPO on tokens; image_loss: FlowGRPO surrogate, velocity MSE, latent KL; nft: the DiffusionNFT image objective.
"""

from unigrpo.algo.advantages import group_advantages, zero_variance_fraction
from unigrpo.algo.guidance import cfg_blend
from unigrpo.algo.image_loss import flow_grpo_loss, latent_kl, ratio_norm_log_ratio, velocity_mse
from unigrpo.algo.nft import forward_noise, implicit_velocities, nft_loss, optimality
from unigrpo.algo.schedule import shift_time, timesteps
from unigrpo.algo.sde import SDEStepResult, gaussian_log_prob, sde_step, sde_window
from unigrpo.algo.text_loss import aggregate_tokens, clipped_surrogate, text_grpo_loss

__all__ = [
    "SDEStepResult",
    "aggregate_tokens",
    "cfg_blend",
    "clipped_surrogate",
    "flow_grpo_loss",
    "forward_noise",
    "gaussian_log_prob",
    "group_advantages",
    "implicit_velocities",
    "latent_kl",
    "nft_loss",
    "optimality",
    "ratio_norm_log_ratio",
    "sde_step",
    "sde_window",
    "shift_time",
    "text_grpo_loss",
    "timesteps",
    "velocity_mse",
    "zero_variance_fraction",
]
