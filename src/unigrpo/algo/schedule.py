"""Time grid of the flow-matching sampler (docs/algorithm.md, "Conventions and formulas").

Convention: flow time ``t`` runs from 1 (pure noise) to 0 (data), ``x_t = (1 - t) x0 + t eps``.
A schedule of ``num_steps`` steps has ``num_steps + 1`` grid points

    t_k = shift(u_k),   u_k = 1 - k / num_steps,   shift(t) = s t / (1 + (s - 1) t),

(SD3 / Flow-GRPO "timestep shift", s = 3 in the paper), so step ``k`` goes from ``t_k`` to
``t_{k+1}``. ``s > 1`` spends more steps at high noise (near t = 1).

Optionally (``terminal``, diffusers' ``shift_terminal``, used by Qwen-Image's scheduler) the grid
before its final 0 is stretched so that its last non-zero point is exactly ``terminal``:

    t_k <- 1 - (1 - t_k) (1 - terminal) / (1 - t_{N-1}),   k < N;   t_N = 0,

which keeps ``t_0 = 1`` and makes the last step go from ``terminal`` to 0.

Choices: the grid is computed in float64 and cast once to ``dtype``; the endpoints are set to
exactly 1 and 0 so that the first step starts from pure noise and the last lands on data.
"""

from __future__ import annotations

import torch

__all__ = ["shift_time", "timesteps"]


def shift_time(t, shift: float):
    """Timestep shift ``shift(t) = s t / (1 + (s - 1) t)``; maps [0, 1] onto [0, 1] monotonically.

    Works on python floats and tensors alike (elementwise). ``s = 1`` is the identity.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def timesteps(num_steps: int, shift: float = 3.0, dtype: torch.dtype = torch.float32,
              terminal: float | None = None) -> torch.Tensor:
    """Grid ``[t_0 = 1, t_1, ..., t_N = 0]`` of ``num_steps + 1`` decreasing flow times.

    ``t_k = shift(linspace(1, 0, num_steps + 1))_k``, stretched to end on ``terminal`` before the
    final 0 when given (module docstring). Returns a 1-D tensor  # [num_steps + 1]
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps}")
    # float64 so that the float32 grid is the correctly rounded shifted grid (no double rounding).
    u = torch.linspace(1.0, 0.0, int(num_steps) + 1, dtype=torch.float64)  # [N + 1]
    t = shift_time(u, shift)  # [N + 1]
    t[0], t[-1] = 1.0, 0.0  # exact endpoints: start from pure noise, end on data
    if terminal is not None:
        if not 0 < terminal < 1 or num_steps < 2:
            raise ValueError(f"terminal must be in (0, 1) with num_steps >= 2, got {terminal} with {num_steps}")
        t[:-1] = 1 - (1 - t[:-1]) * ((1 - terminal) / (1 - t[-2]))
        t[0] = 1.0  # exact start (the stretch keeps it up to rounding)
    return t.to(dtype)

