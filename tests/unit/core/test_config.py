import pytest

from jewelclf import config as cfg
from jewelclf.errors import JewelclfError


def test_defaults_yaml_then_flags(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("model:\n  backbone: vgg16\n  head_units: 256\ntrain:\n  stage1:\n    epochs: 3\n")
    c = cfg.resolve(f, {"train": {"stage1": {"epochs": 7}}})
    assert c.model.backbone == "vgg16"          # YAML overrides the default
    assert c.model.head_units == 256
    assert c.train.stage1.epochs == 7           # the flag overrides the YAML
    assert c.train.stage2.learning_rate == cfg.Config().train.stage2.learning_rate


def test_saved_config_round_trips(tmp_path):
    c = cfg.resolve(None, {"data": {"image_size": 64}, "train": {"seed": 5}})
    p = tmp_path / "config.yaml"
    p.write_text(c.to_yaml())
    assert cfg.from_dict(cfg.load_yaml(p)) == c


def test_int_widens_to_float():
    c = cfg.resolve(None, {"train": {"stage1": {"learning_rate": 1}}})
    assert c.train.stage1.learning_rate == 1.0 and isinstance(c.train.stage1.learning_rate, float)


@pytest.mark.parametrize("text, needle", [
    ("model:\n  backbon: vgg16\n", "'model.backbon'"),
    ("data:\n  batch_size: big\n", "'data.batch_size'"),
    ("train:\n  stage1:\n    epochs: -2\n", "'train.stage1.epochs'"),
    ("data:\n  val_fraction: 1.5\n", "'data.val_fraction'"),
    ("data:\n  cache: sometimes\n", "'data.cache'"),
    ("model: 3\n", "'model'"),
    ("- a\n- b\n", "mapping"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_bad_yaml_is_one_line_naming_the_key(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(JewelclfError) as e:
        cfg.resolve(f)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(JewelclfError, match="does not exist"):
        cfg.resolve(tmp_path / "nope.yaml")


# --- through the command (issue #6: YAML config with unknown keys, wrong types or negative epochs)


@pytest.mark.parametrize("text, needle", [
    ("trian:\n  seed: 1\n", "unknown config key 'trian'; known keys here: augment, data, model, train"),
    ("train:\n  stage1:\n    epoch: 3\n", "unknown config key 'train.stage1.epoch'"),
    ("train:\n  stage1:\n    epochs: three\n", "config key 'train.stage1.epochs' must be int, got 'three' (str)"),
    ("train:\n  stage1:\n    epochs: 2.5\n", "config key 'train.stage1.epochs' must be int, got 2.5 (float)"),
    ("train:\n  stage1:\n    epochs: true\n", "config key 'train.stage1.epochs' must be int, got True (bool)"),
    ("train:\n  stage1:\n    epochs: null\n", "config key 'train.stage1.epochs' must be int, got None"),
    # YAML 1.1 reads 1e-3 (no dot) as a string: the line names the key and the value as read
    ("train:\n  stage1:\n    learning_rate: 1e-3\n", "'train.stage1.learning_rate' must be float, got '1e-3' (str)"),
    ("train:\n  stage1:\n    epochs: -2\n", "config key 'train.stage1.epochs' must not be negative, got -2"),
    ("train:\n  stage2:\n    epochs: -1\n", "config key 'train.stage2.epochs' must not be negative, got -1"),
    ("data:\n  image_size: 0\n", "config key 'data.image_size' must be positive, got 0"),
    ("train:\n  stage2:\n    views: 0\n", "config key 'train.stage2.views' must be positive, got 0"),
    ("train:\n  stage2:\n    cache_activations: always\n",
     "config key 'train.stage2.cache_activations' must be one of auto, on, off, got 'always'"),
])
def test_bad_yaml_through_fit_is_one_line(tmp_path, text, needle):
    from click.testing import CliRunner

    from jewelclf.cli import main

    f = tmp_path / "bad.yaml"
    f.write_text(text)
    result = CliRunner().invoke(main, ["fit", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run"),
                                       "--config", str(f)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert result.stderr.startswith("error: ") and needle in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # refused before the run dir is made


def test_config_file_that_is_not_utf8_is_one_line(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("model:\n  backbone: vgg16  # modèle\n".encode("latin-1"))
    with pytest.raises(JewelclfError) as e:
        cfg.resolve(f)
    assert str(f) in str(e.value) and "UTF-8" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_non_finite_learning_rate_is_refused(tmp_path, value):
    f = tmp_path / "lr.yaml"
    f.write_text(f"train:\n  stage1:\n    learning_rate: {value}\n")
    with pytest.raises(JewelclfError, match="'train.stage1.learning_rate'"):
        cfg.resolve(f)


def test_a_relative_weights_path_is_saved_absolute(tmp_path, monkeypatch):
    """A config a run or a search saves (config.yaml, best_config.yaml) must work from any
    folder: `weights: ../shared/x.h5` as typed would not."""
    from jewelclf.config import resolve

    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp.yaml").write_text("model: {weights: ../w/base.h5}\n")
    assert resolve(tmp_path / "exp.yaml").model.weights == str(tmp_path.parent / "w" / "base.h5")
    flagged = resolve(None, {"model": {"weights": "w.h5"}})
    assert flagged.model.weights == str(tmp_path / "w.h5")
    assert resolve(None, {"model": {"weights": "imagenet"}}).model.weights == "imagenet"
    assert resolve(None, {"model": {"weights": "none"}}).model.weights == "none"
