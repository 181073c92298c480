from pathlib import Path

import pytest

from mri_vqvae.config import Config, ConfigError, load_config, save_config


def test_defaults_are_the_seed_recipe():
    config = Config()
    assert config.data.image_size == (256, 128)
    model = config.model
    assert (model.hidden_channels, model.residual_hidden_channels) == (128, 32)
    assert (model.num_residual_layers, model.num_downsamplings) == (2, 3)
    assert (model.embedding_dim, model.num_embeddings, model.commitment_cost) == (128, 512, 0.25)
    assert (model.ema_decay, model.ema_epsilon) == (0.99, 1e-5)
    train = config.train
    assert (train.epochs, train.batch_size, train.lr) == (20, 32, 1e-3)


def test_yaml_round_trip(tmp_path: Path):
    config = load_config(None, ["model.num_embeddings=64", "data.image_size=[296, 144]"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert config.data.image_size == (296, 144)


def test_overrides_are_typed():
    config = load_config(None, ["train.lr=1e-4", "train.max_minutes=2", "data.image_size=null"])
    assert config.train.lr == pytest.approx(1e-4) and isinstance(config.train.lr, float)
    assert config.train.max_minutes == 2.0
    assert config.data.image_size is None


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.epochs=-1", "train.epochs"),
        ("train.batch_size=0", "train.batch_size"),
        ("model.codebook_update=kmeans", "model.codebook_update"),
        ("model.num_embeddings=many", "model.num_embeddings"),
        ("train.learning_rate=0.1", "learning_rate"),
        ("optimiser.lr=0.1", "optimiser"),
        ("data.image_size=[250, 128]", "data.image_size"),
        ("model.ema_decay=1.5", "model.ema_decay"),
        ("nodots", "section.key=value"),
    ],
)
def test_bad_settings_are_refused_by_name(override: str, named: str):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_yaml_file(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_codes: 12\n")
    with pytest.raises(ConfigError, match="num_codes"):
        load_config(path)


def test_unreadable_yaml_names_the_file(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml"):
        load_config(path)


def test_shipped_configs_load():
    root = Path(__file__).parent.parent / "configs"
    assert load_config(root / "seed.yaml").data.image_size == (296, 144)
    assert load_config(root / "demo.yaml").train.epochs >= 1
