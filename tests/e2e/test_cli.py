"""The command line a new user meets: defaults in --help, no TensorFlow where none is needed,
and no TensorFlow start-up noise unless --verbose."""

from __future__ import annotations

import subprocess
import sys

import click
from click.testing import CliRunner

from jewelclf.cli import main

from conftest import make_class_folder

# Runs a command in a fresh interpreter and prints whether TensorFlow got imported.
_PROBE = """
import sys
from jewelclf.cli import main
try:
    main(sys.argv[1:], standalone_mode=True)
except SystemExit as e:
    code = e.code
print("tensorflow imported:", "tensorflow" in sys.modules, "exit:", code)
"""


def _probe(*args):
    return subprocess.run([sys.executable, "-c", _PROBE, *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_every_fit_and_tune_flag_has_help_and_shows_its_default():
    for name in ("fit", "tune"):
        command = main.commands[name]
        for p in command.params:
            if not isinstance(p, click.Option) or p.name in ("help",):
                continue
            assert p.help, f"{name} {p.opts[0]} has no help text"
            if p.name in ("resume", "overwrite", "verbose", "run_dir", "config_file", "space_file"):
                continue  # actions and files, not settings
            assert "[default: " in p.help or p.show_default, f"{name} {p.opts[0]} shows no default"
    text = " ".join(CliRunner().invoke(main, ["fit", "--help"]).output.split())
    for needle in ("[default: resnet50]", "[default: imagenet]", "[default: 32]", "per replica",
                   "[default: 30]", "[default: 0.001]", "[default: 1e-05]", "[default: 0.2]",
                   "[default: 0.15]", "[default: auto]", "[default: on]", "[default: 1337]"):
        assert needle in text, needle


def test_a_typo_and_predict_server_never_import_tensorflow(tmp_path):
    out = _probe("fit", tmp_path / "no_such_folder", "--run-dir", tmp_path / "run")
    assert "does not exist" in out.stderr and "tensorflow imported: False exit: 2" in out.stdout
    out = _probe("check", tmp_path / "typo")
    assert "tensorflow imported: False exit: 2" in out.stdout, out.stderr
    image = make_class_folder(tmp_path / "d", per_class=1, classes=("ring",)) / "ring" / "ring_000.jpg"
    out = _probe("predict", "--server", "http://127.0.0.1:9", "--model", "m", image, "--timeout", "2")
    assert "cannot reach TF Serving" in out.stderr
    assert "tensorflow imported: False exit: 2" in out.stdout


def test_tensorflow_start_up_lines_are_hidden_unless_verbose(tmp_path):
    data = make_class_folder(tmp_path / "d", per_class=2, classes=("ring", "watch"))
    quiet = subprocess.run([sys.executable, "-m", "jewelclf", "check", str(data), "--image-size", "32"],
                           capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "", quiet.stderr
    assert "clean: nothing found" in quiet.stdout
