"""Time grid: endpoints, monotonicity, shift closed form."""

import pytest
import torch

from unigrpo.algo.schedule import shift_time, timesteps


@pytest.mark.parametrize("num_steps", [1, 2, 10, 25, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_endpoints_length_monotone(num_steps, shift):
    for dtype in (torch.float32, torch.float64):
        t = timesteps(num_steps, shift, dtype)
        assert t.dtype == dtype and t.shape == (num_steps + 1,)
        assert t[0].item() == 1.0 and t[-1].item() == 0.0
        assert (t[1:] < t[:-1]).all()


def test_shift_one_is_linspace():
    assert torch.equal(timesteps(25, 1.0, torch.float64), torch.linspace(1, 0, 26, dtype=torch.float64))


def test_shift_closed_form():
    s, n = 3.0, 8
    t = timesteps(n, s, torch.float64)
    for k in range(n + 1):
        u = 1 - k / n
        assert t[k].item() == pytest.approx(s * u / (1 + (s - 1) * u), rel=1e-15, abs=1e-15)
    # s > 1 puts more of the grid at high noise: the midpoint of the steps lies above 0.5
    assert t[n // 2].item() == pytest.approx(0.75)
    assert shift_time(0.5, 3.0) == pytest.approx(0.75)
    assert shift_time(0.0, 3.0) == 0.0 and shift_time(1.0, 3.0) == 1.0


def test_float32_grid_is_rounded_float64_grid():
    assert torch.equal(timesteps(25, 3.0), timesteps(25, 3.0, torch.float64).float())


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_num_steps(bad):
    with pytest.raises(ValueError):
        timesteps(bad)


def test_bad_shift():
    with pytest.raises(ValueError):
        timesteps(10, 0.0)


@pytest.mark.parametrize("num_steps,shift,terminal", [(2, 1.0, 0.5), (10, 2.0, 0.02), (50, 3.0, 0.1)])
def test_terminal_stretch_ends_on_terminal_and_is_affine_in_one_minus_t(num_steps, shift, terminal):
    """diffusers' shift_terminal: 1 - t scaled by one factor so that the last non-zero point is
    ``terminal``; t_0 = 1 and t_N = 0 stay."""
    plain = timesteps(num_steps, shift, torch.float64)
    t = timesteps(num_steps, shift, torch.float64, terminal=terminal)
    assert t[0] == 1.0 and t[-1] == 0.0 and t[-2].item() == pytest.approx(terminal, abs=1e-15)
    assert bool((t[1:] < t[:-1]).all())
    factor = (1 - terminal) / (1 - plain[-2])
    torch.testing.assert_close(1 - t[:-1], (1 - plain[:-1]) * factor, atol=1e-15, rtol=0)


@pytest.mark.parametrize("terminal,num_steps", [(0.0, 10), (1.0, 10), (0.02, 1)])
def test_bad_terminal(terminal, num_steps):
    with pytest.raises(ValueError, match="terminal"):
        timesteps(num_steps, 3.0, terminal=terminal)
