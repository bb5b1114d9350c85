"""The `ssimkd` command line: parsing, errors, make-data, train + eval, and the smoke demo end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from utils import TINY_DATA_AND_MODEL

from ssimkd_kernels.cli import build_parser, main

TINY = TINY_DATA_AND_MODEL + [
    "train.batch_size=2",
    "train.steps=2",
    "train.progress=false",
    "train.checkpoint_every=0",
]


def test_parser_knows_every_command():
    parser = build_parser()
    for argv in (
        ["info"],
        ["demo", "--preset", "smoke"],
        ["train", "--set", "train.lr=0.1", "kd.mode=ssim"],
        ["eval", "--checkpoint", "m.pt"],
        ["make-data", "--out", "d"],
    ):
        assert parser.parse_args(argv).command == argv[0]
    args = parser.parse_args(["train", "--set", "a.b=1", "--set", "c.d=2", "--resume"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.resume is True
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--preset", "huge"])


def test_bad_override_is_one_clear_line(capsys):
    assert main(["train", "--set", "train.learning_rate=1"]) == 2
    assert "ssimkd: error: unknown config field 'train.learning_rate'" in capsys.readouterr().err
    assert main(["train", "--config", "no-such-preset"]) == 2
    assert "no preset no-such-preset.toml" in capsys.readouterr().err


def test_make_data_writes_coco_files(tmp_path, capsys):
    assert main(["make-data", "--set", *TINY, "--out", str(tmp_path / "shapes")]) == 0
    printed = capsys.readouterr().out
    coco = json.loads((tmp_path / "shapes" / "annotations" / "instances_val.json").read_text())
    assert len(coco["images"]) == 4 and len(list((tmp_path / "shapes" / "train").glob("*.jpg"))) == 8
    assert "val_annotations" in printed and "instances_val.json" in printed


def test_train_then_eval_from_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SSIMKD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "--set", *TINY, f"train.out={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "model.pt"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 4
    assert metrics == pytest.approx(summary["eval"])


def test_demo_smoke_preset_end_to_end(tmp_path):
    """`ssimkd demo --preset smoke` as `make demo` runs it: data, teacher, three students, table, files."""
    env = {**os.environ, "SSIMKD_CACHE": str(tmp_path / "cache")}
    if os.environ.get("PYTEST_XDIST_WORKER"):  # another worker has the other core: one thread each
        env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "ssimkd_kernels", "demo", "--preset", "smoke", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["modes"]) == ["none", "l2", "ssim"]
    for mode, row in results["modes"].items():
        assert len(row["AP_per_seed"]) == len(results["seeds"]) and 0.0 <= row["AP"] <= 100.0
        assert (out / f"{mode}-seed{results['seeds'][0]}" / "model.pt").exists()
    assert 0.0 < results["modes"]["ssim"]["feature_loss_share"] < 1.0
    assert (out / "results.png").stat().st_size > 0 and (out / "teacher" / "model.pt").exists()
    table = result.stdout
    assert "ssim" in table and "paired ssim - l2" in table and "wall time" in table
    assert Path(out / "teacher" / "loss_curve.png").exists()
