"""Tasks: JSONL prompt files (GenEval lines load as they are, bad files are one-line errors naming
file and line), the deterministic training stream, and a real run whose reward reads a custom
metadata field and the sampled reasoning."""

import json
import math

import pytest
import smooth_reward
import torch
from conftest import tiny_overrides

from unigrpo.cli import main
from unigrpo.config import ConfigError, load_config
from unigrpo.tasks import PromptsTask, ShapesTask, build_task, load_prompt_file, reward_metadata

GENEVAL = {"tag": "counting", "include": [{"class": "bench", "count": 2}], "exclude": [{"class": "bench", "count": 3}],
           "prompt": "a photo of two benches"}


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_geneval_metadata_lines_load_as_they_are(tmp_path):
    path = write_jsonl(tmp_path / "geneval.jsonl", [GENEVAL, "", {"prompt": "a red circle", "target": 0.5}])
    prompts = load_prompt_file(path)
    assert [p.text for p in prompts] == ["a photo of two benches", "a red circle"]
    assert prompts[0].metadata == {**{k: v for k, v in GENEVAL.items() if k != "prompt"}, "line": 1}
    assert prompts[1].metadata == {"target": 0.5, "line": 3}  # blank line 2 skipped, numbering kept


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a red circle"}, "{not json"], "bad.jsonl:2: not JSON"),
    ([{"text": "a red circle"}], "bad.jsonl:1: expected a JSON object with a non-empty \"prompt\""),
    ([["a red circle"]], "bad.jsonl:1: expected a JSON object"),
    ([{"prompt": "  "}], "bad.jsonl:1: expected a JSON object"),
    ([{"prompt": "a red circle", "reasoning": "x"}], "bad.jsonl:1: field 'reasoning' is set by unigrpo"),
    ([{"prompt": "a red circle", "line": "x"}], "bad.jsonl:1: field 'line' is set by unigrpo"),
    ([{"prompt": "a red circle", "group_index": 3}], "bad.jsonl:1: field 'group_index' is set by unigrpo"),
    (["[" * 100_000], "bad.jsonl:1: not JSON"),
    (["", "  "], "holds no prompts"),
])
def test_bad_prompt_files_are_one_line_errors_naming_file_and_line(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ConfigError, match="^task.prompts: ") as e:
        load_prompt_file(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_json_line_separators_inside_strings_and_a_bom_are_valid_jsonl(tmp_path):
    """U+2028 / U+2029 / U+0085 are legal inside a JSON string (str.splitlines would cut there);
    a UTF-8 BOM and CRLF line ends are what editors write."""
    text = "a red\u2028circle\u2029on\x85grey"
    rows = [json.dumps({"prompt": text, "note": "x\u2028y"}, ensure_ascii=False), json.dumps({"prompt": "b"})]
    path = tmp_path / "sep.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n")
    prompts = load_prompt_file(path)
    assert [p.text for p in prompts] == [text, "b"]
    assert prompts[0].metadata == {"note": "x\u2028y", "line": 1} and prompts[1].metadata == {"line": 2}


def test_not_utf8_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.jsonl: not UTF-8"):
        load_prompt_file(path)


def test_reward_metadata_keeps_user_fields_and_refuses_to_overwrite():
    meta = {"target": 0.5, "tag": "x", "line": 4}
    assert reward_metadata(meta, "r", 2, 1) == {**meta, "reasoning": "r", "prompt_index": 2, "group_index": 1}
    for key in ("reasoning", "prompt_index", "group_index"):
        with pytest.raises(ValueError, match=f"already holds '{key}'"):
            reward_metadata({key: 0}, "r", 0, 0)


def test_bad_prompt_file_through_the_cli(tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a red circle"}, "{not json"])
    assert main(["validate", "task.kind=prompts", f"task.prompts={path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unigrpo: config error: task.prompts: ") and "bad.jsonl:2: not JSON" in err
    assert len(err.splitlines()) == 1
    assert main(["validate", "task.kind=prompts", f"task.prompts={tmp_path / 'missing.jsonl'}"]) == 2
    assert "prompt file not found" in capsys.readouterr().err
    assert main(["validate", "task.kind=prompts"]) == 2  # no file given
    assert "task.prompts" in capsys.readouterr().err
    assert main(["validate", "task.kind=prompts", "task.prompt_pool=8"]) == 2  # a shapes-only key
    assert "unknown key for task.kind='prompts'" in capsys.readouterr().err


def test_prompt_stream_is_deterministic_and_covers_each_epoch(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"prompt {i}"} for i in range(10)])
    cfg = load_config(None, ["task.kind=prompts", f"task.prompts={path}", "algo.prompts_per_step=2"])
    task = build_task(cfg)
    assert isinstance(task, PromptsTask) and task.eval_prompts()[0].text == "prompt 0"  # eval: the same file
    epoch0 = [p.text for step in range(5) for p in task.train_prompts(step, 2)]
    epoch1 = [p.text for step in range(5, 10) for p in task.train_prompts(step, 2)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(f"prompt {i}" for i in range(10))
    assert epoch0 != epoch1  # a new order every data epoch
    assert [p.text for p in build_task(cfg).train_prompts(7, 2)] == epoch1[4:6]  # same stream, any instance
    three = [p.text for p in task.train_prompts(1, 3)]  # a step straddling two epochs
    assert three == [p.text for p in task.train_prompts(3, 1)] + [p.text for p in task.train_prompts(4, 1)] \
        + [p.text for p in task.train_prompts(5, 1)]


def test_shapes_task_keeps_the_ground_truth_out_of_the_reasoning_key():
    cfg = load_config(None, ["algo.prompts_per_step=4", "task.prompt_pool=16"])
    task = build_task(cfg)
    assert isinstance(task, ShapesTask)
    prompts = task.train_prompts(0, 4)
    assert all("reasoning" not in p.metadata and p.metadata["target_reasoning"].startswith("<think>")
               for p in prompts)
    assert [p.text for p in prompts] == [t.prompt for t in task.world_tasks(0, 4)]


def test_run_on_a_prompt_file_with_a_reward_reading_metadata_and_reasoning(tiny_checkpoint, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a red circle", "target": 0.8, "tag": "bright"},
                                                   {"prompt": "two blue squares", "target": 0.2, "tag": "dark"},
                                                   {"prompt": "a green triangle", "target": 0.5, "tag": "dark"}])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "a yellow circle", "target": 0.9, "tag": "bright"},
                                                  {"prompt": "a red square", "target": 0.1, "tag": "dark"}])
    smooth_reward.SEEN.clear()
    out = tmp_path / "run"
    args = [a for a in tiny_overrides(tiny_checkpoint, out, "task.kind=prompts", f"task.prompts={train}",
                                      f"task.eval_prompts={evals}", "eval.at_start=true",
                                      "rewards=[{name: 'smooth_reward:uses_metadata'}]")
            if not a.startswith("task.prompt_pool")]  # a shapes-only key
    assert main(["train", *args]) == 0
    train_meta = [m for m in smooth_reward.SEEN if m["line"] in (1, 2, 3) and "reasoning" in m]
    rollout = [m for m in train_meta if m["target"] in (0.8, 0.2, 0.5)]
    assert len(rollout) == 2 * 2 * 4  # 2 steps x 2 prompts x group 4 reached the reward
    assert all(m["reasoning"].strip() for m in rollout)  # the SAMPLED reasoning, as text
    for m in rollout:  # the custom field of the line the prompt came from, and its indices
        assert m["target"] == {1: 0.8, 2: 0.2, 3: 0.5}[m["line"]] and m["tag"] in ("bright", "dark")
        assert m["prompt_index"] in (0, 1) and m["group_index"] in range(4)
    assert sorted((m["prompt_index"], m["group_index"]) for m in rollout[:8]) == \
        [(p, g) for p in range(2) for g in range(4)]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals_logged = [r for r in rows if "eval/reward" in r]
    assert [r["step"] for r in evals_logged] == [0, 2]
    for r in evals_logged:
        assert {"eval/reward/smooth_reward:uses_metadata", "eval/category/bright/reward",
                "eval/category/dark/reward"} <= set(r) and all(math.isfinite(v) for v in r.values())
    assert all(r["reward/mean"] == r["reward/smooth_reward:uses_metadata"] for r in rows if "reward/mean" in r)
    assert (out / "grids" / "eval_step000002.md").read_text().startswith("0. `a yellow circle` -> ")


def test_eval_grid_prompts_zero_writes_no_grid(tmp_path):
    """``eval.grid_prompts=0`` (valid) writes metrics only: no grid, no crash in the grid writer."""
    from unigrpo.sampling import Generation
    from unigrpo.tasks import Prompt, write_eval_grid
    from unigrpo.tasks.shapes import write_eval

    cfg = load_config(None, ["eval.grid_prompts=0"])
    gen = Generation(images=torch.rand(2, 3, 8, 8), reasoning=["a", "b"])
    write_eval_grid(gen, [Prompt("p"), Prompt("q")], cfg, 3, tmp_path)
    write_eval(tmp_path / "eval", "after", {"acc": 1.0}, gen, [], grid_prompts=0)
    assert not (tmp_path / "grids").exists() and (tmp_path / "eval" / "after.json").is_file()
    assert not (tmp_path / "eval" / "after.png").exists()


def test_each_task_logs_its_own_rollout_image_statistics(tmp_path):
    """``rollout_metrics``: the shapes task logs the keys the loop always logged (generic statistics,
    the world's off-palette fraction, the within-group RMS distance); the prompts task the same keys
    but the shapes world's own, with the same values."""
    from unigrpo.utils.images import group_rms_distance, image_stats

    images = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(0)) ** 3  # [P * G], G = 4
    shapes = build_task(load_config(None, [])).rollout_metrics(images, 4)
    assert list(shapes) == [f"rollout/{k}" for k in ("saturation", "background_fraction", "brightness",
                                                     "unknown_color_fraction", "high_freq", "group_diversity")]
    assert shapes["rollout/group_diversity"] == group_rms_distance(images.reshape(3, 4, 3, 16, 16)) > 0
    assert all(shapes[f"rollout/{k}"] == v for k, v in image_stats(images).items())
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a red circle"}])
    prompts = build_task(load_config(None, ["task.kind=prompts", f"task.prompts={path}"])).rollout_metrics(images, 4)
    assert prompts == {k: v for k, v in shapes.items() if k != "rollout/unknown_color_fraction"}


def test_cli_eval_asks_the_task_for_its_report(tiny_checkpoint, tmp_path, capsys):
    """`unigrpo eval` prints the task's ``report``: the prompts task's metrics, and no ``gt`` mode
    (one line, exit 2) since its prompts carry no ground-truth reasoning."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a red circle", "tag": "a"}, {"prompt": "a blue square"}])
    args = ["eval", *tiny_overrides(tiny_checkpoint, tmp_path / "run", "task.kind=prompts", f"task.prompts={path}")]
    args = [a for a in args if not a.startswith("task.prompt_pool")]  # a shapes-only key
    assert main([*args, "--mode", "no_think", "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("task prompts, 2 prompts at most, 2 ODE steps, CFG 1.0, thinking off:\n")
    assert "eval/category/a/reward" in out and "eval/unknown_color_fraction" not in out
    assert (tmp_path / "eval" / "grids" / "eval_step000000.png").is_file()
    assert main([*args, "--mode", "gt"]) == 2
    assert capsys.readouterr().err == ("unigrpo: --mode gt needs ground-truth reasoning, which only "
                                       "task.kind=shapes has\n")


@pytest.mark.parametrize("line, says", [
    ({"prompt": "a red zebra"}, "task.prompts: {path}:2: words the model does not know: zebra"),
    ({"prompt": " ".join(["red"] * 70)}, ("task.prompts: {path}:2: a prompt of 71 tokens does not fit "
                                         "model.max_seq_len=64 with 6 reasoning tokens")),
])
def test_a_prompt_the_model_cannot_read_stops_the_run_before_its_directory(tiny_checkpoint, tmp_path, capsys,
                                                                            line, says):
    """Unknown words (which would become <unk>) and a prompt past the context (which would crash
    mid-rollout) are one line naming file and line, exit 2, and the run directory is not created."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a red circle"}, line])
    out = tmp_path / "run"
    args = [a for a in tiny_overrides(tiny_checkpoint, out, "task.kind=prompts", f"task.prompts={path}")
            if not a.startswith("task.prompt_pool")]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unigrpo: " + says.format(path=path)), err
    assert not out.exists()
    assert main(["sample", line["prompt"], *args, "--out", str(tmp_path / "s.png")]) == 2
    assert "does not" in capsys.readouterr().err and not (tmp_path / "s.png").exists()
