"""task.kind=shapes_edit: prompts carry the rendered input and the problem; the evaluation math,
tested with a stand-in editor whose text and image experts are exact (no tiny model edits yet):
it samples the ground-truth response (or, when told, a wrong fact for reasoning-required edits),
and its image expert draws exactly the scene its response describes (the input when it does not
think), so every metric has a closed form."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from unigrpo.config import ConfigError, ShapesEditTaskConfig, load_config
from unigrpo.models.base import UnifiedModel
from unigrpo.rewards.wire import pack_metadata
from unigrpo.tasks import TASKS, build_task, reward_metadata
from unigrpo.utils.images import pairs
from unigrpo.world.detect import detect
from unigrpo.world.edit import EditProblem, render_scenes, wrong_edit_reasoning
from unigrpo.world.tokenizer import build_world_tokenizer

EVAL = ["eval.num_prompts=40", "eval.split=test", "sampler.eval_num_steps=3", "eval.grid_prompts=5", "seed=3"]
EDIT_REWARD = "rewards=[{name: shapes_edit}]"


def edit_cfg(*extra: str, **task):
    """A config with the edit task (validate would refuse it for the tiny model, which cannot edit)."""
    cfg = load_config(None, [*EVAL, EDIT_REWARD, *extra])
    cfg.task = ShapesEditTaskConfig(**task)
    return cfg


class ExactEditor(UnifiedModel):
    """Stand-in editor (module docstring). ``wrong``: reasoning-required edits get a wrong fact."""

    sees_images = True
    edits = True

    def __init__(self, prompts, side: int, wrong: bool = False):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device
        self.tokenizer = tok = build_world_tokenizer()
        self.pad_id, self.stop_ids, self.latent_shape = tok.pad_id, (tok.eos_id,), (3, side, side)
        self.side = side
        # (instruction, input bytes) -> (the response it samples, {response: the scene it draws});
        # keyed by the input too: equal texts (a swap says what, not where) draw different scenes
        self.rows = {}
        rng = np.random.default_rng(0)
        for p in prompts:
            problem = EditProblem.from_metadata(p.metadata)
            draws, sampled = {problem.reasoning: problem.target}, problem.reasoning
            if wrong and problem.requires_reasoning:
                sampled, draws[sampled] = wrong_edit_reasoning(problem, rng)
            self.rows[self._key(p.text, p.images[0])] = sampled, draws

    @staticmethod
    def _key(text: str, image: torch.Tensor):
        return text, image.numpy().tobytes()

    def prompt_ids(self, text):
        return [self.tokenizer.bos_id, *self.tokenizer.encode(text)]

    def response_ids(self, text):
        return self.tokenizer.encode(text) + [self.tokenizer.eos_id]

    def token_text(self, ids):
        return self.tokenizer.decode(ids)

    def sample_reasoning(self, prompts, **options):
        return self.with_response(prompts, [self._row(prompts, i)[0] for i in range(len(prompts))])

    def _row(self, tokens, i: int):
        ids = tokens.ids[i][tokens.mask[i] & ~tokens.response_mask[i]].tolist()
        return self.rows[self._key(self.tokenizer.decode(ids[1:]), tokens.images[i, 0])]

    def forward_context(self, tokens, temperature=1.0):
        """The context is the image to draw: the scene the response describes, else the input."""
        texts = [" ".join(w for w in t.split() if w not in ("<eos>", "<pad>")) for t in self.decode_text(tokens)]
        scenes = {i: self._row(tokens, i)[1].get(t) for i, t in enumerate(texts)}
        rows = [i for i, s in scenes.items() if s is not None]
        ctx = tokens.images[:, 0].clone()  # [B, 3, S, S]: the input
        if rows:
            ctx[rows] = render_scenes([scenes[i] for i in rows], seed=0, size=self.side)
        return torch.zeros(tokens.ids.shape), ctx

    def velocity(self, x_t, t, ctx):
        """The straight path to ``ctx``: Euler steps land on it exactly (t > 0 at every step)."""
        return (x_t - ctx) / t.reshape(-1, 1, 1, 1)

    def decode(self, x0):
        return x0.clamp(0, 1)


def test_prompts_carry_the_rendered_input_and_the_problem():
    cfg = edit_cfg()
    task = build_task(cfg)
    prompts = task.train_prompts(0, 12)
    assert [p.text for p in prompts] == [p.text for p in task.train_prompts(0, 12)]
    assert torch.equal(torch.cat([p.images for p in prompts]), torch.cat([p.images for p in task.train_prompts(0, 12)]))
    assert [p.text for p in task.train_prompts(1, 12)] != [p.text for p in prompts]
    for p in prompts:
        wire = json.loads(json.dumps(pack_metadata([p.metadata], "npy")[0]))  # what a reward service receives
        problem = EditProblem.from_metadata(wire)
        assert p.images.shape == (1, 3, 32, 32) and p.text == problem.instruction
        assert p.metadata["input_images"] is p.images  # the rewards see the input, in process and served
        assert "reasoning" not in p.metadata and p.metadata["target_reasoning"] == problem.reasoning
        reward_metadata(p.metadata, "sampled", 0, 0)  # no key the loop sets
        objs = detect(p.images)
        assert len(objs.cx) == len(problem.source.objects)  # the image is the problem's input
    evals = task.eval_prompts()
    assert len(evals) == 40 and all(p.metadata["split"] in ("test", "all") for p in evals)
    assert [p.text for p in evals] == [p.text for p in build_task(cfg).eval_prompts()]
    with_describe = build_task(edit_cfg(describe_weight=2.0)).eval_prompts()
    assert sum(p.metadata["category"] == "describe" for p in with_describe) > 5
    assert build_task(edit_cfg(image_size=24)).eval_prompts()[0].images.shape == (1, 3, 24, 24)


def test_an_exact_editor_scores_one_everywhere():
    cfg = edit_cfg()
    task = build_task(cfg)
    model = ExactEditor(task.eval_prompts(), 32)
    m = task.evaluate(model, cfg, None, 0, None)
    for k in ("accuracy", "preserved", "seen_ok", "description_ok", "accuracy_given_description_ok",
              "accuracy_reasoning", "accuracy_direct"):
        assert m[f"eval/{k}"] == 1.0, k
    cats = {k.split("/")[2] for k in m if k.startswith("eval/category/")}
    assert len(cats) == 8 and all(m[f"eval/category/{c}/accuracy"] == 1.0 for c in cats)


def test_the_evaluation_separates_the_text_expert_from_the_image_expert(tmp_path):
    cfg = edit_cfg()
    task = build_task(cfg)
    prompts = task.eval_prompts()
    model = ExactEditor(prompts, 32, wrong=True)
    needs = np.array([p.metadata["requires_reasoning"] for p in prompts])
    report = task.report(model, cfg, "all", tmp_path)
    think, gt, blind = (json.loads((tmp_path / f"{m}.json").read_text()) for m in ("think", "gt", "no_think"))
    # wrong facts: the reasoning-required edits fail, the image expert is right wherever the text is
    assert think["accuracy"] == pytest.approx(1 - needs.mean()) and think["accuracy_reasoning"] == 0.0
    assert think["accuracy_direct"] == 1.0 and think["description_ok_reasoning"] == 0.0
    assert think["seen_ok"] == 1.0 and think["accuracy_given_description_ok"] == 1.0
    assert think["preserved"] == 1.0  # a wrong recolour still leaves the other objects alone
    assert gt["accuracy"] == 1.0 and "description_ok" not in gt
    # without thinking it returns the input: every edit fails, every untouched object is preserved
    assert blind["accuracy"] == 0.0 and blind["preserved"] == 1.0
    assert "strict edit accuracy" in report and "untouched objects preserved" in report
    assert "| think | 0." in report and "input seen right" in report
    grid = np.asarray(Image.open(tmp_path / "think.png"))
    assert grid.shape[1] == 2 + 8 * (32 * 4 + 2)  # 4 input | output pairs a row, scale 4, 2 px gaps
    assert (tmp_path / "think.md").read_text().count("->") == 5


def test_evaluate_writes_an_input_output_grid(tmp_path):
    cfg = edit_cfg("eval.thinking=false")
    task = build_task(cfg)
    m = task.evaluate(ExactEditor(task.eval_prompts(), 32), cfg, None, 7, tmp_path)
    assert m["eval/accuracy"] == 0.0 and "eval/seen_ok" not in m and m["perf/eval_s"] > 0
    assert (tmp_path / "grids" / "eval_step000007.png").exists()
    assert "eval/unknown_color_fraction" in m
    images = torch.cat([p.images for p in task.train_prompts(0, 8)])
    r = task.rollout_metrics(images, 4)
    assert set(r) >= {"rollout/group_diversity", "rollout/background_fraction"}


def test_config_needs_a_model_that_sees_and_edits():
    with pytest.raises(ConfigError, match=r"^task.kind: 'shapes_edit' needs a model with edits, sees_images;") as e:
        load_config(None, ["task.kind=shapes_edit"])
    assert "\n" not in str(e.value)
    assert TASKS["shapes_edit"] is type(build_task(edit_cfg()))
    assert ShapesEditTaskConfig().needs() == {"sees_images", "edits"}
    for bad, key in [({"image_size": 8}, "task.image_size"), ({"prompt_pool": 1}, "task.prompt_pool"),
                     ({"describe_weight": -1.0}, "task.describe_weight")]:
        cfg = edit_cfg(**bad)
        with pytest.raises(ConfigError, match=f"^{key}: "):
            cfg.task.check(cfg)
    cfg = edit_cfg("rewards=[{name: shapes_edit}, {name: shapes_edit_dense, weight: 0.5}]")
    cfg.task.check(cfg)
    cfg = load_config(None, EVAL)  # the default reward, "shapes", reads a text-to-image spec
    cfg.task = ShapesEditTaskConfig()
    with pytest.raises(ConfigError, match=r"^rewards\[0\].name: 'shapes' scores text-to-image prompts; task.kind="):
        cfg.task.check(cfg)


def test_pairs_interleave_inputs_and_outputs_and_resize_inputs():
    inputs = torch.rand(3, 3, 8, 8)
    outputs = torch.rand(3, 3, 16, 16)
    x = pairs(inputs, outputs)
    assert x.shape == (6, 3, 16, 16) and torch.equal(x[1::2], outputs)
    assert torch.equal(x[0], inputs[0].repeat_interleave(2, 1).repeat_interleave(2, 2))  # nearest x2
    with pytest.raises(ValueError, match="3 inputs but 2 outputs"):
        pairs(inputs, outputs[:2])
