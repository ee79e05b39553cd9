"""benchmarks/vs_flow_grpo.py without flow_grpo: our side's image-only step is a real FlowGRPO
update (the transformer's weights change, the first re-scoring gives ratio exactly 1), its window
sits where it was told, and the benchmark refuses a folder that is not a flow_grpo checkout."""

import importlib.util
from pathlib import Path

import pytest
import torch
from testkit import scratch_dir

pytest.importorskip("diffusers")
_spec = importlib.util.spec_from_file_location(
    "vs_flow_grpo", Path(__file__).resolve().parents[1] / "benchmarks" / "vs_flow_grpo.py")
vs_flow_grpo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs_flow_grpo)


@pytest.fixture(scope="module")
def ours():
    from diffusers import StableDiffusion3Pipeline

    folder = vs_flow_grpo.build_pipeline(scratch_dir("unigrpo_vs_flow_grpo_"))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(Path(folder) / "pipe"))
    torch.manual_seed(0)
    return vs_flow_grpo.build_ours(folder, vs_flow_grpo.encode_batch(pipe, vs_flow_grpo.PROMPTS[:2], 2), 2)


def test_our_step_updates_the_transformer_on_policy(ours):
    s = vs_flow_grpo.SETTINGS["fast"]
    rnd = ours.sample(s, 0, start=1)
    grid = ours.model.timesteps(vs_flow_grpo.NUM_STEPS, None)
    assert torch.equal(rnd.t[0], grid[1:1 + s["window_size"]])  # the window starts where it was told
    assert rnd.images.shape == (4, 3, vs_flow_grpo.RESOLUTION, vs_flow_grpo.RESOLUTION)
    before = {n: p.detach().clone() for n, p in ours.model.sd3.dit.named_parameters()}
    info = ours.step(s, 0, start=1)
    assert info["logp_diff_max"] == 0.0 and info["ratio_max"] == 1.0
    assert any(not torch.equal(before[n], p) for n, p in ours.model.sd3.dit.named_parameters())


def test_cfg_setting_guides_with_the_negative_prompt(ours):
    """With CFG the velocity is v_u + s (v_c - v_u), v_u read from the negative-prompt embedding."""
    from unigrpo.rollout import guided_velocity

    m = ours.model
    _, ctx = m.forward_context(m.tokens(len(m.hidden)))
    x, t = torch.randn(len(m.hidden), *m.latent_shape), torch.full((len(m.hidden),), 0.7)
    with torch.no_grad():
        v_c, v_u = m.velocity(x, t, ctx), m.velocity(x, t, m.null_context(len(m.hidden)))
        v = guided_velocity(m, x, t, ctx, m.null_context(len(m.hidden)), 4.5)
    torch.testing.assert_close(v, v_u + 4.5 * (v_c - v_u))


def test_refuses_a_folder_that_is_not_a_flow_grpo_checkout(tmp_path):
    with pytest.raises(SystemExit, match="not a flow_grpo checkout"):
        vs_flow_grpo.load_flow_grpo(str(tmp_path))
