"""The `recap` command line: help, config show, errors with exit code 2, samples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.cli import main

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def test_help_is_fast_and_imports_nothing_heavy():
    code = "import sys; from pipeline.cli import build_parser; build_parser(); print(sorted(m for m in ('ray','av','torch','cv2') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_config_show_prints_resolved_yaml(capsys):
    assert (
        main(
            [
                "config",
                "show",
                "--config",
                str(PROJECT_ROOT / "configs" / "smoke.yaml"),
                "--set",
                "split.detector=adaptive",
            ]
        )
        == 0
    )
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["split"]["detector"] == "adaptive"
    assert shown["split"]["adaptive"]["window_width"] == 2  # a default filled in
    assert shown["ray"]["num_cpus"] == 2


def test_config_error_exits_2_with_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest:\n  min_frames: -3\n")
    assert main(["config", "show", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "ingest.min_frames: -3" in err and "greater than or equal to 1" in err


def test_missing_input_exits_2(tmp_path, capsys):
    assert main(["ingest", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", "--output", str(tmp_path / "o"), "--stages", "ingest,magic"]) == 2
    assert "magic" in capsys.readouterr().err


def test_samples_command_writes_videos_and_truth(tmp_path, capsys):
    assert main(["samples", str(tmp_path)]) == 0
    truth = json.loads((tmp_path / "cuts.json").read_text())
    assert set(truth) == {p.name for p in tmp_path.glob("*.mp4")} and len(truth) == 3
    assert "cuts at frames" in capsys.readouterr().out
