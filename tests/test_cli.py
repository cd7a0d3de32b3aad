"""The `bnseq` command line."""

import subprocess
import sys

import pytest

import bnseq
from bnseq import cli


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"bnseq {bnseq.__version__}\n"


def test_help(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "usage: bnseq" in out and "demo" in out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: bnseq" in capsys.readouterr().out


def test_unknown_command(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["nonsense"])
    assert exit.value.code == 2
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err


def test_demo(capsys):
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert 'Model: "by_hand"' in out and 'Model: "bnseq"' in out
    assert "Parameters: by hand 30,735,202, bnseq 30,735,202 (identical)." in out
    assert "132 parameters (conv2d" in out


def test_python_dash_m():
    result = subprocess.run(
        [sys.executable, "-m", "bnseq", "--version"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0
    assert result.stdout == f"bnseq {bnseq.__version__}\n"
