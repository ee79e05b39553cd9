"""Typed config: defaults valid, YAML + overrides, and one-line errors that name the key."""

from pathlib import Path

import pytest
import yaml

from unigrpo.config import (
    Config,
    ConfigError,
    builtin_configs,
    load_config,
    resolve_config_path,
    to_dict,
    validate,
)
from unigrpo.utils.typed_config import from_dict, kind_of


def test_defaults_are_valid_and_round_trip(tmp_path):
    cfg = validate(Config())
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(path) == cfg


def test_overrides_are_typed(tmp_path):
    cfg = load_config(None, ["algo.group_size=4", "sampler.window_range=[1, 4]", "algo.c_mse=1e-4",
                             "algo.adv_clip=null", "text.thinking=false", "optim.lr_text=2"])
    assert cfg.algo.group_size == 4
    assert cfg.sampler.window_range == (1, 4)
    assert cfg.algo.c_mse == pytest.approx(1e-4) and isinstance(cfg.algo.c_mse, float)
    assert cfg.algo.adv_clip is None and cfg.text.thinking is False
    assert isinstance(cfg.optim.lr_text, float)


@pytest.mark.parametrize("override, key", [
    ("algo.grup_size=4", "algo.grup_size"),             # unknown key
    ("algo.group_size=four", "algo.group_size"),        # wrong type
    ("algo.group_size=2.5", "algo.group_size"),         # float for int
    ("text.thinking=maybe", "text.thinking"),           # not a bool
    ("sampler.kind=euler", "sampler.kind"),             # not in Literal
    ("sampler.window_range=[1, 2, 3]", "sampler.window_range"),
    ("algo.group_size=1", "algo.group_size"),           # impossible: no group statistics
    ("sampler.window_size=6", "sampler.window_size"),   # window wider than its range
    ("sampler.window_range=[0, 12]", "sampler.window_range"),  # past the number of steps
    ("algo.trajectories_per_minibatch=7", "algo.trajectories_per_minibatch"),
    ("text.top_p=0", "text.top_p"),
    ("pretrain.wrong_reasoning_frac=1.5", "pretrain.wrong_reasoning_frac"),
    ("nosuch.key=1", "nosuch"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert msg.startswith(key), msg
    assert "\n" not in msg


def test_window_larger_than_steps_is_rejected():
    with pytest.raises(ConfigError, match="sampler.window_range"):
        load_config(None, ["sampler.num_steps=3"])  # default range (0, 5) no longer fits


def test_ode_sampler_cannot_train_image_policy():
    with pytest.raises(ConfigError, match="sampler.kind"):
        load_config(None, ["sampler.kind=ode"])
    cfg = load_config(None, ["sampler.kind=ode", "algo.train_image=false"])
    assert cfg.sampler.kind == "ode"


def test_unknown_key_suggests_the_close_name():
    with pytest.raises(ConfigError, match="did you mean group_size"):
        from_dict(Config, {"algo": {"grup_size": 3}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: [1, 2")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_reward_list_section():
    cfg = load_config(None, ["rewards=[{name: shapes, weight: 0.5}, {name: 'pkg.mod:fn', weight: 2}]"])
    assert [r.name for r in cfg.rewards] == ["shapes", "pkg.mod:fn"]
    with pytest.raises(ConfigError, match=r"rewards\[0\].wieght"):
        load_config(None, ["rewards=[{name: shapes, wieght: 1}]"])


def test_builtin_config_loads_the_packaged_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # independent of the working directory
    path = resolve_config_path("builtin:unigrpo")
    assert path.is_file() and path.name == "unigrpo.yaml" and path.parent.name == "configs"
    cfg = load_config("builtin:unigrpo", ["seed=7"])
    assert cfg == load_config(path, ["seed=7"]) and cfg.seed == 7
    assert cfg.output_dir == "runs/unigrpo"


def test_plain_paths_are_unchanged(tmp_path):
    assert resolve_config_path(tmp_path / "c.yaml") == tmp_path / "c.yaml"
    assert resolve_config_path("configs/x.yaml") == Path("configs/x.yaml")


def test_unknown_builtin_is_one_line_error_naming_the_available():
    with pytest.raises(ConfigError) as e:
        load_config("builtin:unigpro")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("builtin:unigpro")  # the closest names; all: `unigrpo configs`
    assert "did you mean builtin:unigrpo" in msg and f"lists the {len(builtin_configs())} shipped" in msg


def test_builtin_descriptions_are_one_line():
    shipped = builtin_configs()
    assert {"demo", "unigrpo", "pretrain", "flowgrpo", "textgrpo"} <= set(shipped)
    assert all(d and "\n" not in d and not d.startswith("#") for d in shipped.values())


def test_sections_with_a_kind_pick_their_dataclass():
    """`task.kind` (and `model.kind`) select the section's dataclass, which checks the other keys."""
    from unigrpo.config import PromptsTaskConfig, ShapesTaskConfig

    assert isinstance(load_config(None, []).task, ShapesTaskConfig)
    cfg = load_config(None, ["task.kind=prompts", "task.prompts=p.jsonl"])
    assert isinstance(cfg.task, PromptsTaskConfig) and cfg.task.prompts == "p.jsonl"
    assert to_dict(cfg)["task"] == {"kind": "prompts", "prompts": "p.jsonl", "eval_prompts": None}
    with pytest.raises(ConfigError, match=r"^task.kind: must be one of 'shapes', 'prompts', 'shapes_edit', "
                                          r"'shapes_refine', got 'nope'$"):
        load_config(None, ["task.kind=nope"])
    with pytest.raises(ConfigError, match=r"^task.prompts: unknown key for task.kind='shapes'"):
        load_config(None, ["task.prompts=p.jsonl"])
    with pytest.raises(ConfigError, match=r"^model.kind: must be one of 'tiny', 'hf', 'bagel', got 'nope'$"):
        load_config(None, ["model.kind=nope"])
    with pytest.raises(ConfigError, match=r"^model.image_size: unknown key for model.kind='hf'"):
        load_config(None, ["model.kind=hf", "model.pipeline=p", "model.image_size=32"])


def test_every_model_kind_has_a_builder_and_a_config_section():
    import typing

    from unigrpo import config
    from unigrpo.models import KINDS
    from unigrpo.utils.typed_config import kind_of

    sections = typing.get_args(config.ModelConfig) or (config.ModelConfig,)
    assert set(KINDS) == {kind_of(s) for s in sections}


def test_importing_the_config_imports_no_torch():
    """The config (and each kind's section) is light: `unigrpo configs` and an hf / bagel config
    load without torch."""
    import subprocess
    import sys

    code = ("import sys; from unigrpo.config import load_config; "
            "load_config(None, ['model.kind=hf', 'model.pipeline=p']); print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


@pytest.mark.parametrize("overrides, message", [
    (["model.image_size=18"], "model.image_size: must be a multiple of 4 in [16, 64]"),
    (["model.max_seq_len=40", "text.max_reasoning_tokens=22"],
     ("text.max_reasoning_tokens: 22 does not fit model.max_seq_len=40 after the longest prompt (19 tokens): "
     "at most 21")),
    (["model.kind=hf"], "model.pipeline: a pipeline folder (save_pretrained) or hub id is required"),
    (["model.kind=hf", "model.pipeline=p", "model.reasoner=a b"],
     "model.reasoner: a b is not a folder (it does not exist)"),  # not a hub id: a path, and none exists
    (["model.kind=hf", "model.pipeline=p", "model.lora.image_rank=-1"], "model.lora.text_rank: ranks must be >= 0"),
    (["model.kind=hf", "model.pipeline=p", "model.resolution=100"],
     "model.resolution: must be a positive multiple of 16"),
    (["model.kind=hf", "model.pipeline=p", "model.max_text_tokens=0"], "model.max_text_tokens: must be >= 1"),
    (["model.kind=bagel", "model.lora.text_rank=-1"], "model.lora.text_rank: ranks must be >= 0"),
    (["model.kind=bagel", "model.resolution=8"], "model.resolution: must be a positive multiple of 16"),
    (["model.kind=bagel", "model.logits_chunk=0"], "model.logits_chunk: must be >= 1"),
    (["model.kind=bagel", "model.dtype=bfloat16", "model.lora.image_rank=0"],
     ("model.dtype: bfloat16 weights cannot take the small AdamW steps of a fully trained expert "
     "(model.lora.image_rank=0: the update rounds away, and this adapter keeps no float32 master copy); "
     "use model.dtype=float32 or LoRA")),
    (["task.prompt_pool=4"], "task.prompt_pool: must be >= algo.prompts_per_step"),
    (["task.kind=prompts"], "task.prompts: a JSONL file of prompts is required for task.kind=prompts"),
    (["pretrain.uncond_frac=-0.1"], "pretrain.uncond_frac: must be in [0, 1], got -0.1"),
])
def test_each_section_refuses_its_bad_input_in_one_line(overrides, message):
    """Each kind's section checks its own keys (``check(cfg)``, called by validate), with the same
    one-line messages as when validate held a branch per kind."""
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value) == message


def test_each_kind_checks_only_its_own_section():
    """The tiny model's context check is the tiny model's: a bagel config with the same text
    settings is valid; and each section's check is a method of its dataclass."""
    load_config(None, ["model.kind=bagel", "text.max_reasoning_tokens=200"])
    with pytest.raises(ConfigError, match="^text.max_reasoning_tokens: 200 does not fit"):
        load_config(None, ["text.max_reasoning_tokens=200"])
    cfg = load_config(None, [])
    cfg.model.image_size = 7  # validate is not the one who knows: the section's check refuses it
    with pytest.raises(ConfigError, match="^model.image_size: "):
        cfg.model.check(cfg)


def test_a_null_shift_needs_a_model_with_its_own_schedule():
    """``sampler.shift: null`` asks ``model.own_schedule`` (declared by each kind), not a kind name."""
    import typing

    from unigrpo import config

    own = {kind_of(m): m.own_schedule for m in typing.get_args(config.ModelConfig)}
    assert own == {"tiny": False, "hf": True, "bagel": True}
    with pytest.raises(ConfigError) as e:
        load_config(None, ["sampler.shift=null"])
    assert str(e.value) == ("sampler.shift: null (the model's own schedule) needs a model that has one, "
                            "e.g. model.kind=hf; set a number")
    assert load_config(None, ["model.kind=bagel", "sampler.shift=null"]).sampler.shift is None


def test_batch_groups_is_valid_for_every_model_kind():
    """``text.batch_groups`` is no longer refused by model kind (every kind decodes groups in one loop)."""
    assert load_config(None, ["text.batch_groups=true"]).text.batch_groups is True
    assert load_config(None, ["model.kind=bagel", "text.batch_groups=true"]).text.batch_groups is True


def test_validate_names_no_kind():
    """Per-kind and per-task knowledge lives in the sections' ``check``: validate's source names none."""
    import inspect

    from unigrpo import config

    source = inspect.getsource(config.validate)
    assert not any(f'"{k}"' in source or f"'{k}'" in source for k in ("tiny", "hf", "bagel", "shapes", "prompts"))


def test_a_task_that_needs_a_capability_the_model_lacks_is_one_line(monkeypatch):
    """A task whose episodes need input images seen (or edited) refuses a model kind that cannot,
    at validate, naming both; the same task with a kind that can passes."""
    from unigrpo.config import ShapesTaskConfig
    from unigrpo.models.tiny_config import TinyModelConfig

    monkeypatch.setattr(ShapesTaskConfig, "needs", lambda self: frozenset({"sees_images"}))
    with pytest.raises(ConfigError) as e:
        load_config(None, [])
    assert str(e.value) == ("task.kind: 'shapes' needs a model with sees_images; model.kind='tiny' has neither")
    monkeypatch.setattr(TinyModelConfig, "capabilities", frozenset({"sees_images", "edits"}))
    load_config(None, [])


def test_the_decode_keys_reach_every_kind_or_are_refused_in_one_line():
    """``text.token_sampler`` is every model's (its engine call); ``text.static_cache`` / ``compile``
    exist for the hf kinds' transformers LMs only, and another kind refuses them in one line."""
    from unigrpo.models import build_model

    assert build_model(load_config(None, ["text.token_sampler=inverse_cdf"]), checkpoint=None).token_sampler == "inverse_cdf"
    assert build_model(load_config(None, []), checkpoint=None).token_sampler == "multinomial"
    for key in ("text.static_cache=true", "text.compile=true"):
        with pytest.raises(ValueError, match=r"^text.static_cache / text.compile: TinyUnifiedModel decodes on its own cache[^\n]*$"):
            build_model(load_config(None, [key]), checkpoint=None)
    with pytest.raises(ValueError, match="token_sampler"):
        load_config(None, ["text.token_sampler=gumbel"])
