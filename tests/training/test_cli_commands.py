"""The ``quintet`` command in-process (``quintet.cli.main``) on the toy systems."""

from __future__ import annotations

import json

import pytest

from quintet.cli import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_resume_eval_sample(toy_systems, tmp_path, capsys):
    out = str(tmp_path / "run")
    code, stdout, _ = run(
        capsys, "train", "toy", "--preset", "tiny", "--steps", "3", "--batch-size", "2", "--out", out, "--device", "cpu"
    )
    assert code == 0 and "done: step 3" in stdout
    # resuming takes the checkpoint's preset and settings; flags still override them
    code, stdout, _ = run(capsys, "train", "toy", "--out", out, "--resume", "--steps", "5", "--device", "cpu")
    assert code == 0 and "resumed from" in stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 5 and summary["preset"] == "tiny"
    state_settings = json.loads((tmp_path / "run" / "checkpoints" / "step_00000005" / "run_config.json").read_text())
    assert state_settings["settings"]["batch_size"] == 2

    code, stdout, _ = run(capsys, "eval", "toy", "--checkpoint", out, "--device", "cpu")
    assert code == 0 and json.loads(stdout) == pytest.approx(summary["eval_metrics"])
    code, stdout, _ = run(capsys, "sample", "toy", "--checkpoint", out, "--device", "cpu")
    assert code == 0 and len(stdout.split()) == 12


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["train", "toy", "--device", "tpu"], ["device", "tpu"]),
        (["train", "toy", "--parallel", "zero3"], ["--parallel", "zero3"]),
        (["train", "toy", "--ema-decay", "1.5"], ["ema_decay"]),
        (["train", "toy", "--resume", "--out", "nowhere"], ["resume", "no checkpoint"]),
        (["train", "toy", "--data", "corpus.txt", "--steps", "1"], ["data"]),
        (["sample", "toy"], ["--checkpoint"]),
        (["eval", "nosuch", "--checkpoint", "."], ["nosuch"]),
        (["demo", "--systems", "toy,nosuch"], ["nosuch"]),
        (["demo", "--systems", ","], ["systems"]),
        (["bench", "nosuch"], ["nosuch"]),
        (["bogus"], ["bogus"]),
    ],
)
def test_bad_command_lines_are_one_line_errors(toy_systems, tmp_path, monkeypatch, capsys, args, fragments):
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run(capsys, *args)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_train_help_shows_the_presets_values(toy_systems, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "toy", "--preset", "tiny", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--batch-size INT samples per micro-batch on each process (default: 4)" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "demo" in capsys.readouterr().out


def test_list(toy_systems, capsys):
    code, stdout, _ = run(capsys, "list")
    rows = [line.split()[:2] for line in stdout.splitlines()]
    assert code == 0 and ["toy", "tiny"] in rows and ["toy2", "demo"] in rows


def test_demo_writes_a_report_and_summary(toy_systems, tmp_path, capsys):
    out = tmp_path / "demo"
    code, _, _ = run(capsys, "demo", "--out", str(out), "--systems", "toy", "--budget-s", "1")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["systems"]) == ["toy"] and summary["systems"]["toy"]["status"] == "ok"
    assert "val_loss" in summary["systems"]["toy"]["metrics"]
    report = (out / "report.html").read_text()
    assert "toy: for the demo" in report and "data:image/png;base64," in report
