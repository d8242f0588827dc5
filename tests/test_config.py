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
