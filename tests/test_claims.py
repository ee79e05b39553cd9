"""benchmarks/claims.py (the claims suite, reduced to a smoke run: every row trains 2 tiny steps and
is evaluated in its 4 settings) and the arithmetic of benchmarks/reward_hacking.py. The experiment
itself is not run here: docs/results.md has its numbers and commands."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unigrpo.config import load_config
from unigrpo.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_the_claims_suite_runs_every_row_and_each_row_trains_what_it_says(tmp_path):
    claims = _module("claims")
    res_path = tmp_path / "res"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "claims.py"), "--smoke", "--seeds", "0",
                           "--parallel", "2", "--root", str(tmp_path / "runs"), "--results", str(res_path)],
                          check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(res_path.with_suffix(".json").read_text())["rows"]
    assert list(rows) == list(claims.ROWS)
    for name, r in rows.items():
        assert set(r["settings"]) == set(claims.SETTINGS)
        for s in r["settings"].values():
            assert len(s["accuracy"]) == 1 and 0 <= s["accuracy"][0] <= 1
        assert (name == "sft") == ("step_s" not in r)
    assert "| unigrpo_nft | 1 |" in res_path.with_suffix(".md").read_text()

    # which expert moved: the rows are the ablations they claim to be
    model = build_model(load_config("builtin:demo"))
    groups = {g: {n for n, _ in ps} for g, ps in model.parameter_groups().items()}
    sft = model.trainable_state()

    def moved(row: str) -> set[str]:
        final = load_file(tmp_path / "runs" / row / "seed0" / "final.safetensors")
        return {g for g, names in groups.items() if any(not torch.equal(final[n], sft[n]) for n in names)}

    assert moved("textgrpo") == {"text"}
    assert moved("flowgrpo") == {"image"}
    for row in ("unigrpo", "unigrpo_cfg", "unigrpo_kl", "unigrpo_noreg", "unigrpo_nft"):
        assert moved(row) == {"text", "image"}, row


def test_reward_hacking_coverage_and_matched_gain_by_hand():
    rh = _module("reward_hacking")
    img = torch.zeros(2, 3, 4, 4)
    img[0, 1, :2] = 0.9  # 8 of 16 pixels bright in one channel
    img[1, :, 0, 0] = 0.49  # below the object threshold
    assert rh.coverage(img, None, None).tolist() == [0.5, 0.0]
    ev = [{"proxy": 1.0, "accuracy": 0.6}, {"proxy": 1.1, "accuracy": 0.5}, {"proxy": 1.3, "accuracy": 0.3}]
    assert rh.at_matched_gain(ev, 0.2) == pytest.approx(0.4)  # halfway from 1.1 to 1.3
    assert rh.at_matched_gain(ev, 0.05) == pytest.approx(0.55)
    assert rh.at_matched_gain(ev, 0.5) is None


def test_results_doc_sections_are_replaced_in_place():
    results = _module("results")
    text = "intro\n<!-- claims -->\n<!-- /claims -->\nprose\n"
    once = results.replace_section(text, "claims", "| a |\n| b |\n")
    assert once == "intro\n<!-- claims -->\n| a |\n| b |\n<!-- /claims -->\nprose\n"
    assert results.replace_section(once, "claims", "| c |") == "intro\n<!-- claims -->\n| c |\n<!-- /claims -->\nprose\n"
    with pytest.raises(SystemExit, match="no <!-- other -->"):
        results.replace_section(text, "other", "x")
