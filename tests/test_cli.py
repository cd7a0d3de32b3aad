"""The `bnseq` command line."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import layers

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


def test_demo(capsys, tmp_path):
    plot = tmp_path / "demo.png"
    assert cli.main(["demo", "--epochs", "2", "--seed", "1", "--out", str(plot)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("Digits (scikit-learn, 8x8): 1347 training and 450 test images.")
    assert "2 epochs, seed 1." in lines[0]
    epoch_lines = [line for line in lines if " epoch " in line]
    assert len(epoch_lines) == 3 * 2  # one line per epoch per network
    header = lines.index(next(line for line in lines if line.startswith("network ")))
    assert lines[header].split() == [
        "network", "parameters", "wasted", "on", "biases", "test", "accuracy", "training", "time"
    ]
    table = [line.split() for line in lines[header + 1 : header + 4]]
    assert [row[0] for row in table] == ["no", "naive", "bnseq"]
    plain, naive, ours = table
    assert plain[3:5] == ["27,710", "0"]
    assert naive[2:4] == ["28,910", "300"] and ours[1:3] == ["28,610", "0"]
    assert all(0.0 <= float(row[-3]) <= 1.0 for row in table)
    assert "3 of 3 BatchNormalization layers folded, 10 -> 4 layers" in out
    assert "The naive network: 3 of 3 BatchNormalization layers fold, 3 of them forward into the Dense" in out
    assert "bnseq.lint of the naive network: 6 findings" in out
    assert f"Plot of test accuracy against training step: {plot}" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_rejects_a_bad_epoch_count(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["demo", "--epochs", "0"])
    assert exit.value.code == 2
    assert "argument --epochs: must be at least 1, not 0" in capsys.readouterr().err


def test_demo_checks_its_output_path_before_training(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    assert cli.main(["demo", "--epochs", "1", "--out", str(tmp_path / "file" / "plot.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bnseq: error: cannot write the plot to '{tmp_path / 'file' / 'plot.png'}': ")
    assert len(err.splitlines()) == 1
    (tmp_path / "folder.png").mkdir()
    assert cli.main(["demo", "--epochs", "1", "--out", str(tmp_path / "folder.png")]) == 2
    assert capsys.readouterr().err.endswith(": it is a directory\n")


def test_epochs_must_be_a_number(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["demo", "--epochs", "abc"])
    assert exit.value.code == 2
    assert "argument --epochs: expected a whole number of at least 1. Received: abc" in capsys.readouterr().err


def test_fold_creates_missing_folders_and_writes_whole_files_only(trained_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "new" / "folder" / "out.keras"
    assert cli.main(["fold", str(trained_file), str(out)]) == 0
    assert keras.saving.load_model(out).layers
    before = out.read_bytes()

    def fails_halfway(self, path, *args, **kwargs):
        with open(path, "wb") as file:
            file.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(keras.Model, "save", fails_halfway)
    assert cli.main(["fold", str(trained_file), str(out)]) == 2
    assert capsys.readouterr().err.endswith(f"cannot write '{out}': disk full\n")
    assert out.read_bytes() == before
    assert sorted(path.name for path in out.parent.iterdir()) == ["out.keras"]


def test_python_dash_m():
    result = subprocess.run(
        [sys.executable, "-m", "bnseq", "--version"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0
    assert result.stdout == f"bnseq {bnseq.__version__}\n"


# bnseq lint ---------------------------------------------------------------------


@pytest.fixture
def model_files(tmp_path):
    import keras
    from keras import layers

    clean = tmp_path / "clean.keras"
    bnseq.Sequential(
        [keras.Input((4,)), layers.Dense(3, activation="relu")], batch_norm=True
    ).save(clean)
    messy = tmp_path / "messy.keras"
    keras.Sequential(
        [keras.Input((4,)), layers.Dense(3, activation="relu", name="d"), layers.BatchNormalization(name="bn")]
    ).save(messy)
    return clean, messy


def test_lint_clean_file_exits_0(model_files, capsys):
    clean, _ = model_files
    assert cli.main(["lint", str(clean)]) == 0
    assert capsys.readouterr().out == ""


def test_lint_findings_exit_1_one_line_each(model_files, capsys):
    clean, messy = model_files
    assert cli.main(["lint", str(clean), str(messy)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[:3] for line in lines] == [
        [
            str(messy),
            "bn",
            "BN001 Dense 'd' adds a bias that is redundant once BatchNormalization 'bn' moves before "
            "the activation, where its `beta` does the bias's job (3 parameters wasted). Write "
            "`Dense(..., use_bias=False)`, or let bnseq.Sequential(batch_norm=True) do it.",
        ],
        [
            str(messy),
            "bn",
            "BN002 BatchNormalization 'bn' comes after the nonlinearity of Dense 'd'; it belongs "
            "between the linear layer and its activation. Write the linear layer without activation, "
            "then BatchNormalization, then the activation as its own layer, or let "
            "bnseq.Sequential(batch_norm=True) do it.",
        ],
    ]


def test_lint_json(model_files, capsys):
    import json

    _, messy = model_files
    assert cli.main(["lint", "--format", "json", str(messy)]) == 1
    findings = json.loads(capsys.readouterr().out)
    assert [(f["file"], f["layer"], f["code"], f["producer"]) for f in findings] == [
        (str(messy), "bn", "BN001", "d"),
        (str(messy), "bn", "BN002", "d"),
    ]
    assert all(f["message"] for f in findings)


def test_lint_json_clean_is_an_empty_list(model_files, capsys):
    clean, _ = model_files
    assert cli.main(["lint", "--format", "json", str(clean)]) == 0
    assert capsys.readouterr().out.strip() == "[]"


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: d / "missing.keras", "No such file: '{path}'"),
        (lambda d: d, "'{path}' is a directory, not a .keras file"),
        (
            lambda d: _write(d / "notes.txt", b"hello"),
            "'{path}' is not a .keras file (a .keras file is a zip archive written by `model.save()`).",
        ),
        (lambda d: _zip(d / "other.keras"), "Keras cannot load '{path}': "),
    ],
)
def test_lint_unreadable_file_exits_2_with_one_line(tmp_path, capsys, make, expected):
    path = make(tmp_path)
    assert cli.main(["lint", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("bnseq: error: " + expected.format(path=path))
    assert len(captured.err.splitlines()) == 1 and "Traceback" not in captured.err


def test_lint_keeps_going_after_a_bad_file(model_files, tmp_path, capsys):
    _, messy = model_files
    assert cli.main(["lint", str(tmp_path / "missing.keras"), str(messy)]) == 2
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2  # messy's findings still reported
    assert captured.err.startswith("bnseq: error: No such file")


def test_lint_console_script_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bnseq", "lint", str(tmp_path / "nope.keras")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"bnseq: error: No such file: '{tmp_path / 'nope.keras'}'"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_umask_s_mode_and_an_existing_file_keeps_its_own(trained_file, tmp_path, umask):
    """0.5 wrote fold and recalibrate outputs 0600, the mode of the temporary file moved into place."""
    import os
    import stat

    out = tmp_path / "out.keras"
    previous = os.umask(umask)
    try:
        assert cli.main(["fold", str(trained_file), str(out)]) == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    out.chmod(0o640)
    assert cli.main(["fold", str(trained_file), str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


def test_an_output_where_no_file_can_be_made_exits_2_with_one_line(trained_file, capsys, monkeypatch):
    """0.5 made its temporary file outside the `try`: a traceback and exit status 1."""
    import tempfile

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    folder = os.path.dirname(str(trained_file))
    assert cli.main(["fold", str(trained_file), os.path.join(folder, "out.keras")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err and "Permission denied" in err


def _write(path, data):
    path.write_bytes(data)
    return path


def _zip(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not a model")
    return path


# bnseq fold ---------------------------------------------------------------------


@pytest.fixture
def trained_file(tmp_path):
    import keras
    import numpy as np
    from keras import layers

    model = bnseq.Sequential(
        [keras.Input((6, 6, 2)), layers.Conv2D(3, 3, activation="relu"), layers.Flatten(), layers.Dense(2)],
        batch_norm=True,
    )
    rng = np.random.default_rng(0)
    model.compile(optimizer="sgd", loss="mse")
    model.fit(rng.normal(size=(16, 6, 6, 2)), rng.normal(size=(16, 2)), epochs=2, verbose=0)
    path = tmp_path / "trained.keras"
    model.save(path)
    return path


def test_fold_writes_a_plain_model(trained_file, tmp_path, capsys):
    import keras

    out = tmp_path / "folded.keras"
    assert cli.main(["fold", str(trained_file), str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Folded 2 of 2 BatchNormalization layers into the layers before them."
    assert lines[1].startswith("Largest output difference on a random probe: ")
    difference = float(lines[1].split(": ")[1].split(" ")[0])
    assert difference < 1e-4
    assert lines[2] == f"Wrote {out}"
    folded = keras.saving.load_model(out)
    assert [type(layer).__name__ for layer in folded.layers] == ["Conv2D", "Flatten", "Dense"]


def test_fold_lists_what_it_kept(tmp_path, capsys):
    import keras
    from keras import layers

    path = tmp_path / "late.keras"
    keras.Sequential(
        [keras.Input((4,)), layers.Dense(3, activation="relu", name="d"), layers.BatchNormalization(name="late")]
    ).save(path)
    assert cli.main(["fold", str(path), str(tmp_path / "out.keras")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [
        "Folded 0 of 1 BatchNormalization layers into the layers before them.",
        "  kept late: kept, Dense 'd' applies its activation before it; only a linear layer "
        "with the identity activation folds",
    ]


def test_fold_strict_fails_and_writes_nothing(tmp_path, capsys):
    import keras
    from keras import layers

    path = tmp_path / "late.keras"
    keras.Sequential([keras.Input((4,)), layers.ReLU(), layers.BatchNormalization(name="late")]).save(path)
    out = tmp_path / "out.keras"
    assert cli.main(["fold", "--strict", str(path), str(out)]) == 1
    err = capsys.readouterr().err
    assert "1 BatchNormalization layer(s) of model 'sequential' cannot be folded:" in err
    assert "- late: kept, it follows ReLU 're_lu', which is not a linear layer" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (lambda d, good: [str(d / "missing.keras"), str(d / "out.keras")], "No such file: '{d}/missing.keras'"),
        (
            lambda d, good: [str(_write(d / "x.keras", b"junk")), str(d / "out.keras")],
            "'{d}/x.keras' is not a .keras file",
        ),
        (
            lambda d, good: [str(good), str(_write(d / "plain", b"a file")) + "/out.keras"],
            "cannot write '{d}/plain/out.keras': ",
        ),
        (lambda d, good: [str(good), str(d / "out.h5")], "the output file must end in .keras. Received: {d}/out.h5"),
    ],
)
def test_fold_bad_files_exit_2_with_one_line(trained_file, tmp_path, capsys, arguments, expected):
    assert cli.main(["fold", *arguments(tmp_path, trained_file)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("bnseq: error: " + expected.format(d=tmp_path))
    assert len(captured.err.splitlines()) == 1 and "Traceback" not in captured.err


def test_an_error_without_a_message_is_still_one_line(tmp_path, capsys, monkeypatch):
    def refuse(path, safe_mode):
        raise OSError()

    monkeypatch.setattr(bnseq.reading.files, "as_model", refuse)
    assert cli.main(["fold", str(tmp_path / "in.keras"), str(tmp_path / "out.keras")]) == 2
    assert capsys.readouterr().err == "bnseq: error: OSError\n"


def test_recalibrate_writes_exact_statistics(tmp_path, capsys):
    model = bnseq.Sequential([keras.Input((3,)), layers.Dense(4, name="d")], batch_norm=True)
    model.save(tmp_path / "in.keras")
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(40, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    assert cli.main(["recalibrate", str(tmp_path / "in.keras"), str(tmp_path / "out.keras"),
                     "--data", str(tmp_path / "x.npy"), "--batch-size", "7"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"Recalibrated 1 BatchNormalization layers on {tmp_path / 'x.npy'}."
    assert out[2].split()[:2] == ["d_bn", "40"]
    restored = keras.saving.load_model(tmp_path / "out.keras")
    features = x @ keras.ops.convert_to_numpy(restored.get_layer("d").kernel).astype(np.float64)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(restored.get_layer("d_bn").moving_mean),
                               features.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(restored.get_layer("d_bn").moving_variance),
                               features.var(axis=0), rtol=1e-5, atol=1e-6)


def test_recalibrate_bad_data_exit_2(tmp_path, capsys):
    model = bnseq.Sequential([keras.Input((3,)), layers.Dense(4)], batch_norm=True)
    model.save(tmp_path / "in.keras")
    missing = tmp_path / "missing.npy"
    assert cli.main(["recalibrate", str(tmp_path / "in.keras"), str(tmp_path / "out.keras"),
                     "--data", str(missing)]) == 2
    assert capsys.readouterr().err == (
        f"bnseq: error: cannot read the data '{missing}': [Errno 2] No such file or directory: '{missing}'\n"
    )
    assert not (tmp_path / "out.keras").exists()


@pytest.mark.parametrize(
    ("size", "passes"), [("auto", "1.00"), ("0", None), ("1K", None), ("2.5M", "1.00")]
)
def test_recalibrate_cache_limit(tmp_path, capsys, size, passes):
    model = bnseq.Sequential(
        [keras.Input((3,)), layers.Dense(4, activation="relu"), layers.Dense(4, name="d")], batch_norm=True
    )
    model.save(tmp_path / "in.keras")
    np.save(tmp_path / "x.npy", np.random.default_rng(1).normal(size=(40, 3)).astype("float32"))
    assert cli.main(["recalibrate", str(tmp_path / "in.keras"), str(tmp_path / "out.keras"),
                     "--data", str(tmp_path / "x.npy"), "--cache-limit", size]) == 0
    footer = capsys.readouterr().out.splitlines()[-2]
    work = footer.split()[0]
    assert footer.endswith("MiB of activations kept")
    if passes is None:  # too small to keep the first layer's output: the second level starts from the data
        assert float(work) > 1.0
    else:
        assert work == passes


def test_recalibrate_cache_limit_must_be_a_size(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["recalibrate", "in.keras", "out.keras", "--data", "x.npy", "--cache-limit", "lots"])
    assert "expected 'auto' or a size such as 500M. Received: lots" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["recalibrate", "in.keras", "out.keras", "--data", "x.npy", "--cache-limit=-1M"])
    assert "a size cannot be negative. Received: -1M" in capsys.readouterr().err
