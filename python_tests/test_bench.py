"""The bench suite stays runnable: each script end to end at tiny sizes (no timing is asserted)."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import bench_ssim  # noqa: E402
import bench_train_step  # noqa: E402


def test_bench_ssim_writes_a_table_and_json(tmp_path, capsys):
    saved = bench_ssim.main(
        [
            "--workload",
            "small",
            "--device",
            "cpu",
            "--candidates",
            "reference,cpu,pytorch_msssim",
            "--warmup",
            "0",
            "--repeats",
            "2",
            "--out",
            str(tmp_path),
            "--no-png",
        ]
    )
    assert len(saved) == 1
    result = json.loads(saved[0].read_text())
    assert result["workload"] == "small" and result["environment"]["torch"]
    rows = {(row["candidate"], row["mode"]) for row in result["rows"]}
    assert {("reference", "fwd"), ("cpu", "fwd"), ("reference", "fwd+bwd"), ("cpu", "fwd+bwd")} <= rows
    assert all(row["median_ms"] > 0 for row in result["rows"] if "median_ms" in row)
    assert "cpu" in capsys.readouterr().out


def test_bench_train_step_times_every_kd_mode(tmp_path):
    result = bench_train_step.main(
        [
            "--device",
            "cpu",
            "--size",
            "64,86",
            "--fpn-channels",
            "16",
            "--teacher-depth",
            "18",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--modes",
            "l2,ssim-fused",
            "--out",
            str(tmp_path),
        ]
    )
    assert [row["mode"] for row in result["rows"]] == ["l2", "ssim-fused"]
    assert result["rows"][0]["vs_l2"] == pytest.approx(1.0)
    assert all(row["median_s"] > 0 for row in result["rows"])
    assert len(list(tmp_path.glob("train-step-*.json"))) == 1


def test_trainer_memory_reports_growth_from_the_training_log(tmp_path):
    import trainer_memory

    result = trainer_memory.main(
        ["--steps", "4", "--log-every", "1", "--set", "train.batch_size=2", "--out", str(tmp_path)]
    )
    assert [r["step"] for r in result["records"]] == [1, 2, 3, 4]
    rss = result["summary"]["mem_rss_mb"]
    assert rss["end"] > 0 and rss["max"] >= rss["end"]
    assert len(list(tmp_path.glob("trainer-memory-*.json"))) == 1
