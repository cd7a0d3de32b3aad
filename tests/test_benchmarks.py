"""The benchmarks still run (quick mode: tiny sizes; figures mean nothing)."""

import pytest

from benchmarks import run


@pytest.mark.parametrize("name", sorted(run.BENCHMARKS))
def test_benchmark_runs_in_quick_mode(name, capsys, tmp_path):
    assert run.main(["--quick", "--only", name, "--out", str(tmp_path / "results.md")]) == 0
    out = capsys.readouterr().out
    assert f"## {run.BENCHMARKS[name][0]}" in out
    assert "|---|" in out  # a table was printed
    assert not (tmp_path / "results.md").exists()  # quick runs write nothing
