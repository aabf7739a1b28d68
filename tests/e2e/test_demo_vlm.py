"""End-to-end: the vision-language demo (`make demo-vlm`): a tiny LLaVA with random weights learns to name the
colour of the shape it is shown; held-out exact match rises by more than 50 points.

Marked `e2e` (about 2.5 minutes on a 2-core CPU): skip locally with `-m "not e2e"`; CI runs it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sftlab.cli import main
from sftlab.demo import make_vlm

pytestmark = pytest.mark.e2e
CONFIG = Path(make_vlm.__file__).with_name("demo_vlm.yaml")


def test_the_vision_demo_learns_to_see(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo's paths are relative to where `make demo-vlm` runs
    make_vlm.main([])
    assert main(["train", str(CONFIG)]) == 0
    result = json.loads((tmp_path / "runs/demo-vlm/match_eval.json").read_text())
    before, after = result["before"]["accuracy"], result["after"]["accuracy"]
    assert after - before > 0.5, result
    assert (tmp_path / "runs/demo-vlm/processor_config.json").is_file()
    shutil.rmtree(tmp_path / "runs")
