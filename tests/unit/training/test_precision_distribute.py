"""Precision, XLA and tf.distribute (issue 5): train.precision, train.jit_compile, train.distribute.

The two-worker test starts two real processes on 127.0.0.1 with their own ``TF_CONFIG``, as two
machines would be started; they train the tiny backbone in step through
``MultiWorkerMirroredStrategy`` on the CPU.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from click.testing import CliRunner

from jewelclf import config as cfg
from jewelclf.cli import main
from jewelclf.errors import JewelclfError
from jewelclf.modeling.classifier import build_classifier
from jewelclf.training.features import frozen_features
from jewelclf.training.runtime import precision_policy, resolve_precision
from jewelclf.training.stages import _compile

from conftest import TESTS, TINY_FLAGS, make_split_folder

SHORT = [*TINY_FLAGS, "--epochs", "2", "--fine-tune-epochs", "1", "--unfreeze-blocks", "1"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _config(**train):
    return cfg.resolve(None, {"model": {"backbone": "tiny_cnn", "weights": "none"},
                              "data": {"image_size": 32}, "train": train})


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


# --- precision ----------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_softmax_and_cached_features_stay_float32_under_mixed_precision(precision):
    before = keras.mixed_precision.dtype_policy().name
    with precision_policy(precision) as resolved:
        assert resolved == precision
        model = build_classifier(_config(), 3)
        low = precision.split("_")[1]
        assert model.get_layer("backbone").compute_dtype == low
        # Pixels stay float32 through augmentation and preprocessing (RandomGaussianBlur
        # cannot run in float16); the backbone casts them.
        assert model.get_layer("augmentation").compute_dtype == "float32"
        assert model.get_layer("preprocessing").compute_dtype == "float32"
        x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
        for training in (False, True):
            out = model(x, training=training)
            assert keras.backend.standardize_dtype(out.dtype) == "float32"
            np.testing.assert_allclose(np.asarray(out).sum(axis=1), 1.0, rtol=1e-3)
        # Stage 1's cached features come out of a float16/bfloat16 backbone: kept as float32.
        ds = tf.data.Dataset.from_tensor_slices((x, np.eye(3, dtype="float32")[[0, 1, 2, 0]])).batch(3)
        train_f, val_f = frozen_features(model, ds, ds)
        assert train_f.dtype == np.float32 and train_f.shape == (4, 16)
        assert val_f.dtype == np.float32
    assert keras.mixed_precision.dtype_policy().name == before  # no leak into other tests


def test_auto_precision_is_float32_without_a_gpu():
    expected = "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"
    assert resolve_precision("auto") == expected
    assert resolve_precision("mixed_bfloat16") == "mixed_bfloat16"


def test_jit_compile_reaches_compile():
    model = build_classifier(_config(), 3)
    head = model.get_layer("head")
    _compile(head, 1e-3, _config(jit_compile="on"))
    assert head.jit_compile is True
    _compile(head, 1e-3, _config(jit_compile="off"))
    assert head.jit_compile is False


# --- config -------------------------------------------------------------------------------------


def test_config_keys_defaults_yaml_and_errors(tmp_path):
    c = cfg.resolve()
    assert (c.train.precision, c.train.jit_compile, c.train.distribute) == ("auto", "auto", "none")
    f = tmp_path / "exp.yaml"
    # YAML 1.1 reads a bare on/off as a boolean: it still means on/off here.
    f.write_text("train:\n  precision: mixed_bfloat16\n  jit_compile: off\n  distribute: mirrored\n"
                 "  stage1:\n    cache_features: on\n")
    c = cfg.resolve(f)
    assert (c.train.precision, c.train.jit_compile, c.train.distribute) == (
        "mixed_bfloat16", "off", "mirrored")
    assert c.train.stage1.cache_features == "on"
    assert cfg.from_dict(yaml.safe_load(c.to_yaml())) == c  # config.yaml round-trips
    for key, value in [("precision", "float16"), ("jit_compile", "xla"), ("distribute", "tpu")]:
        with pytest.raises(JewelclfError, match=f"'train.{key}' must be one of") as e:
            cfg.resolve(None, {"train": {key: value}})
        assert "\n" not in str(e.value)


def test_cli_flags_map_onto_the_config(tmp_path):
    from jewelclf.cli_options import overrides as _overrides

    assert _overrides(precision="mixed_float16", jit_compile="off", distribute="mirrored") == {
        "train": {"precision": "mixed_float16", "jit_compile": "off", "distribute": "mirrored"}}
    result = run("fit", tmp_path, "--run-dir", tmp_path / "r", "--precision", "float16")
    assert result.exit_code == 2 and "float16" in result.output


# --- fit ----------------------------------------------------------------------------------------


def test_fit_under_mixed_float16_with_cached_features(tmp_path):
    data = make_split_folder(tmp_path / "data", train=8, test=2)
    run_dir = tmp_path / "run"
    result = run("fit", data, "--run-dir", run_dir, *SHORT, "--precision", "mixed_float16",
                 "--jit-compile", "off")
    assert result.exit_code == 0, result.output
    assert "precision mixed_float16, jit_compile off" in result.output
    assert keras.mixed_precision.dtype_policy().name == "float32"  # restored after the run
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["status"] == "finished" and info["precision"] == "mixed_float16"
    assert info["jit_compile"] == "off" and info["distribute"]["mode"] == "none"
    stage1 = info["summary"]["stage1"]
    assert stage1["cached_features"] is True and stage1["jit_compile"] is False
    assert info["summary"]["stage2"]["epochs"] == 1
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    assert (saved["precision"], saved["jit_compile"], saved["distribute"]) == (
        "mixed_float16", "off", "none")
    assert (run_dir / "metrics.json").is_file()
    import jewelclf.modeling.registry  # noqa: F401  registers the custom layers

    model = keras.saving.load_model(run_dir / "model.keras")
    # The saved layers keep their policy: the backbone's convolutions compute in float16.
    assert model.get_layer("backbone").get_layer("block1_conv").compute_dtype == "float16"
    out = model(np.zeros((1, 32, 32, 3), "float32"))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"


def test_fit_mirrored_in_one_process(tmp_path):
    data = make_split_folder(tmp_path / "data", train=8, test=0)
    run_dir = tmp_path / "run"
    result = run("fit", data, "--run-dir", run_dir, *SHORT, "--distribute", "mirrored")
    assert result.exit_code == 0, result.output
    replicas = max(1, len(tf.config.list_physical_devices("GPU")))
    assert f"distribute mirrored: {replicas} replica(s)" in result.output
    assert (f"global batch {8 * replicas} = data.batch_size 8 per replica x {replicas} replica(s)"
            in result.output)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["status"] == "finished"
    assert info["distribute"] == {"mode": "mirrored", "replicas": replicas, "workers": 1}


# --- multi_worker -------------------------------------------------------------------------------


@pytest.mark.parametrize("tf_config, needle", [
    (None, "needs the TF_CONFIG environment variable"),
    ("{not json", "TF_CONFIG is not valid JSON"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}}', "needs a 'cluster' and a 'task'"),
    ('{"cluster": {"worker": "127.0.0.1:1"}, "task": {"type": "worker", "index": 0}}',
     "must list 'worker' addresses"),
    ('{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 2}}',
     "is not one of its cluster's"),
])
def test_multi_worker_needs_a_valid_tf_config(tmp_path, monkeypatch, tf_config, needle):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    line = _one_line_error(run("fit", tmp_path, "--run-dir", tmp_path / "r", *TINY_FLAGS,
                               "--distribute", "multi_worker"))
    assert needle in line
    assert not (tmp_path / "r").exists()  # refused before the run dir was touched


def test_resume_refuses_a_multi_worker_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(
        _config(distribute="multi_worker").to_yaml())
    (run_dir / "run_info.json").write_text(json.dumps({"status": "interrupted", "data": str(tmp_path)}))
    line = _one_line_error(run("fit", "--resume", "--run-dir", run_dir))
    assert "multi_worker" in line and "--overwrite" in line


def test_tune_fast_mode_under_mixed_precision(tmp_path):
    """The features shared by all trials come from a float16 backbone; trials train on them."""
    from conftest import tiny_tune_files

    data = make_split_folder(tmp_path / "data", train=8, test=0)
    conf, space = tiny_tune_files(tmp_path, {"head_units": {"choice": [0, 16]}}, stage2=0)
    run_dir = tmp_path / "search"
    result = run("tune", data, "--run-dir", run_dir, "--config", conf, "--space", space,
                 "--tuner", "random", "--max-trials", 1, "--precision", "mixed_float16",
                 "--jit-compile", "off")
    assert result.exit_code == 0, result.output
    assert "precision mixed_float16, jit_compile off" in result.output
    assert "fast mode: features ready" in result.output
    assert keras.mixed_precision.dtype_policy().name == "float32"  # restored after the search
    best = yaml.safe_load((run_dir / "best_config.yaml").read_text())["train"]
    assert (best["precision"], best["jit_compile"]) == ("mixed_float16", "off")
    line = _one_line_error(run("tune", data, "--run-dir", run_dir, "--resume", "--precision",
                               "float32"))
    assert "drop --precision" in line


def test_tune_refuses_distribute(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("train:\n  distribute: mirrored\n")
    line = _one_line_error(run("tune", tmp_path, "--run-dir", tmp_path / "t", "--config", conf))
    assert "train.distribute must be none" in line
    assert not (tmp_path / "t").exists()  # refused before the run dir is touched


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_two_workers_on_localhost_train_one_run(tmp_path):
    """Two processes, one per worker of TF_CONFIG, same command and --run-dir (a shared disk)."""
    data = make_split_folder(tmp_path / "data", train=8, test=2)
    run_dir = tmp_path / "run"
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    args = [sys.executable, str(TESTS / "tiny_cli.py"), "fit", str(data), "--run-dir", str(run_dir),
            *SHORT, "--distribute", "multi_worker"]
    procs = []
    try:
        for i in range(2):
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "-1",
                   "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
            procs.append(subprocess.Popen(args, env=env, text=True, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 300  # both workers, in all
        outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"worker {i}:\n{outputs[i]}\nother:\n{outputs[1 - i]}"
    chief, worker = outputs
    for out in outputs:
        assert "global batch 16 = data.batch_size 8 per replica x 2 replica(s)" in out
    assert "worker 0 of 2 (chief: writes the run dir)" in chief
    assert "run finished in" in chief and str(run_dir) in chief
    assert "worker 1 finished" in worker and "the chief wrote the run" in worker
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["status"] == "finished"
    assert info["distribute"] == {"mode": "multi_worker", "replicas": 2, "workers": 2}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_examples"] == 6
    assert (run_dir / "model.keras").is_file() and not (run_dir / "resume").exists()
    # The non-chief worker wrote only to its temporary folder, and removed it.
    temp = re.search(r"writes only to (\S+) \(removed", worker).group(1)
    assert not Path(temp).exists()
