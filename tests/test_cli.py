"""The console command: help texts, and user errors as one line with exit code 2 (no traceback)."""

import subprocess
import sys

import pytest

from jobs import cli

SUBCOMMANDS = list(cli.COMMANDS)


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_top_level_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"anatdiff {name}" in out
    if name not in ("benchmark",):
        assert "--config" in out


def test_unknown_command(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_missing_input_folder_is_one_line(tmp_path):
    r = run("preprocess", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "nope" in lines[0]


def test_config_with_wrong_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x\noptim:\n  stepz: 3\n")
    r = run("pretrain", "--config", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "optim.stepz" in r.stderr and "unknown field" in r.stderr


def test_pretrain_without_corpus(tmp_path):
    r = run("pretrain", "--data", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "anatdiff preprocess" in r.stderr


def test_evaluate_needs_a_model(tmp_path):
    r = run("evaluate", "--data", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
