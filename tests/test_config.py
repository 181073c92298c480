import dataclasses
import re
import time
from pathlib import Path

import pytest

from mri_vqvae.config import Config, ConfigError, load_config, save_config
from tests.helpers import fifo


def test_seed_preset_is_the_seed_recipe():
    config = load_config(preset="seed")
    assert config.data.image_size == (256, 128)
    model = config.model
    assert (model.architecture, model.channels, model.channel_multipliers) == (
        "seed",
        64,
        (1, 2, 2),
    )
    assert (model.num_residual_layers, model.residual_hidden_channels) == (2, 32)
    assert (model.embedding_dim, model.num_embeddings, model.commitment_cost) == (128, 512, 0.25)
    assert (model.codebook_update, model.codebook_init, model.dead_code_steps) == (
        "loss",
        "uniform",
        0,
    )
    assert model.output_activation == "none"
    train = config.train
    assert (train.epochs, train.batch_size, train.lr, train.lr_schedule) == (
        20,
        32,
        1e-3,
        "constant",
    )
    assert (train.grad_clip_norm, train.pixel_loss, train.ssim_loss) == (None, "mse", "none")


def test_compression_presets():
    assert Config().model.num_downsamplings == 3
    assert load_config(preset="8x") == Config()
    assert load_config(preset="4x").model.num_downsamplings == 2


def test_gan_presets_add_the_adversarial_and_spectral_terms_to_their_compression():
    for compression, levels in (("8x", 3), ("4x", 2)):
        config = load_config(preset=f"{compression}-gan")
        assert config.model == load_config(preset=compression).model
        assert config.model.num_downsamplings == levels
        assert config.train.adversarial_weight > 0 and config.train.spectral_loss_weight > 0
    assert Config().train.adversarial_weight == 0 == Config().train.spectral_loss_weight


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "train.adversarial_weight=-1",
            r"train.adversarial_weight must be a finite number in \[0, 100\]",
        ),
        ("train.discriminator_layers=0", "train.discriminator_layers must be at least 1"),
        (
            "train.discriminator_lr=0",
            r"train.discriminator_lr must be a finite number in \(0, 10\]",
        ),
        ("train.adaptive_weight_max=0", r"train.adaptive_weight_max must be .* in \(0, 10000\]"),
    ],
)
def test_bad_adversarial_settings_are_named(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_preset_then_file_then_overrides(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_embeddings: 64\ntrain:\n  epochs: 3\n")
    config = load_config(path, ["train.epochs=5"], preset="seed")
    assert config.model.architecture == "seed"  # from the preset
    assert config.model.num_embeddings == 64  # the file wins over the preset
    assert config.train.epochs == 5  # the override wins over the file


def test_unknown_preset_is_named():
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        load_config(preset="fast")


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
        ("train.precision=float8", "train.precision"),
        ("train.memory_format=nhwc", "train.memory_format"),
        ("augment.copies=-1", "augment.copies must be at least 0, got -1"),
        ("augment.copies=1.5", "augment.copies must be an integer"),
        ("augment.max_shift=-0.1", "augment.max_shift must be a finite number in"),
        ("augment.max_shift=0.6", "augment.max_shift must be a finite number in"),
        (
            "augment.max_rotation_degrees=200",
            "augment.max_rotation_degrees must be a finite number in",
        ),
        ("augment.max_scale=-1", "augment.max_scale must be a finite number in"),
        ("augment.max_gamma=2", "augment.max_gamma must be a finite number in"),
        ("augment.max_contrast=1", "augment.max_contrast must be a finite number in"),
        ("augment.flip_left_right=maybe", "augment.flip_left_right must be true or false"),
        ("augment.rotate=1", "rotate"),
    ],
)
def test_bad_settings_are_refused_by_name(override: str, named: str):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_float16_is_a_precision_but_not_with_the_adversarial_term():
    assert load_config(None, ["train.precision=float16"]).train.precision == "float16"
    with pytest.raises(ConfigError, match="float16 does not support the adversarial term"):
        load_config(None, ["train.precision=float16"], preset="8x-gan")


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


def test_yaml_nested_too_deeply_is_refused_by_name(tmp_path: Path):
    path = tmp_path / "deep.yaml"
    path.write_text("train: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match=r"deep\.yaml nests too deeply"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override 'train\.lr=\[\[\[.*nests too deeply"):
        load_config(overrides=["train.lr=" + "[" * 100_000])


def test_a_huge_bad_value_is_named_in_a_short_message(tmp_path: Path):
    path = tmp_path / "huge.yaml"
    path.write_text("model:\n  architecture: " + "x" * 1_000_000 + "\n")
    with pytest.raises(ConfigError, match=r"model\.architecture must be one of") as caught:
        load_config(path)
    assert len(str(caught.value)) < 200 and str(caught.value).endswith("...")
    with pytest.raises(ConfigError, match=r"model must be a mapping, got 'aaa") as caught:
        load_config(overrides=["model=" + "a" * 100_000])
    assert len(str(caught.value)) < 200


def test_a_config_fifo_is_refused_rather_than_waited_on(tmp_path: Path):
    path = tmp_path / "settings.yaml"
    with fifo(path), pytest.raises(ConfigError, match=r"settings\.yaml is not a regular file"):
        load_config(path)


def test_shipped_configs_load():
    root = Path(__file__).parent.parent / "configs"
    seed = load_config(root / "seed.yaml")
    assert seed.data.image_size == (296, 144)
    assert seed.model == load_config(preset="seed").model
    assert seed.train == load_config(preset="seed").train
    assert load_config(root / "demo.yaml").train.epochs >= 1
    assert load_config(root / "demo_prior.yaml").prior_train.epochs >= 1


def test_one_tree_holds_every_section_and_round_trips(tmp_path: Path):
    config = load_config(
        overrides=[
            "prior.num_layers=2",
            "prior_train.epochs=3",
            "sample.top_k=5",
            "sample_metrics.reference_slices=64",
            "augment.copies=2",
            "augment.flip_left_right=true",
            "augment.max_rotation_degrees=6",
        ]
    )
    assert [f.name for f in dataclasses.fields(config)] == [
        "data",
        "model",
        "train",
        "prior",
        "prior_train",
        "augment",
        "sample",
        "sample_metrics",
    ]
    path = tmp_path / "all.yaml"
    save_config(config, path)
    assert load_config(path) == config
    assert load_config(path).augment.max_rotation_degrees == 6.0


def test_the_two_loop_sections_share_fields_but_keep_their_own_defaults():
    from mri_vqvae.config import LoopConfig, PriorTrainConfig, TrainConfig

    shared = {f.name for f in dataclasses.fields(LoopConfig)}
    assert shared <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert shared <= {f.name for f in dataclasses.fields(PriorTrainConfig)}
    assert (TrainConfig().batch_size, PriorTrainConfig().batch_size) == (8, 16)
    assert (TrainConfig().warmup_steps, PriorTrainConfig().warmup_steps) == (25, 20)
    # The adversarial presets keep the batch and rate they were measured with: their start
    # step counts steps.
    gan = load_config(None, [], preset="8x-gan").train
    assert (gan.batch_size, gan.lr, gan.adversarial_start_step) == (32, 1e-3, 500)
    # A bad value is named with its own section.
    with pytest.raises(ConfigError, match=r"prior_train\.lr must be a finite number in \(0, 10\]"):
        load_config(overrides=["prior_train.lr=0"])
    with pytest.raises(ConfigError, match=r"^train\.lr must be a finite number in \(0, 10\]"):
        load_config(overrides=["train.lr=0"])


def test_a_hand_built_quantizer_has_the_configuration_defaults():
    from mri_vqvae.config import ModelConfig
    from mri_vqvae.model import VectorQuantizer

    quantizer = VectorQuantizer(8, 4)
    assert quantizer.dead_code_steps == ModelConfig().dead_code_steps


def test_config_command_prints_the_resolved_tree_as_a_loadable_file(tmp_path: Path, capsys):
    from mri_vqvae.cli import main

    assert main(["config", "--preset", "seed", "sample.temperature=0.9"]) == 0
    printed = capsys.readouterr().out
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    config = load_config(path)
    assert config == load_config(preset="seed", overrides=["sample.temperature=0.9"])
    assert config.model.architecture == "seed" and config.sample.temperature == 0.9
    assert "augment:\n  copies: 0\n  flip_left_right: false\n" in printed
    assert main(["config", "sample.temperature=-1"]) == 2
    assert "sample.temperature must be a finite number > 0" in capsys.readouterr().err


def test_augment_settings_refuse_nan_when_built_by_hand():
    from mri_vqvae.config import AugmentConfig

    with pytest.raises(
        ConfigError, match=r"augment\.max_gamma must be a finite number in \[0, 1\], got nan"
    ):
        AugmentConfig(max_gamma=float("nan"))


def test_each_prior_architecture_has_its_own_default_depth_unless_one_is_given():
    from mri_vqvae.config import PRIOR_DEFAULT_LAYERS, PriorConfig

    assert PRIOR_DEFAULT_LAYERS == {"transformer": 4, "masked": 6, "pixelcnn": 6}
    assert load_config(None, []).prior.num_layers == 4
    assert load_config(None, ["prior.architecture=pixelcnn"]).prior.num_layers == 6
    assert load_config(None, ["prior.architecture=masked"]).prior.num_layers == 6
    assert load_config(None, ["prior.num_layers=8"]).prior.num_layers == 8
    assert PriorConfig(architecture="pixelcnn", num_layers=3).num_layers == 3
    with pytest.raises(ConfigError, match=r"prior\.num_layers must be at least 1"):
        load_config(None, ["prior.num_layers=0"])


def _billion_laughs() -> str:
    """A kilobyte of YAML whose aliases expand to 9**9 strings."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 10):
        aliases = ", ".join([f"*a{level - 1}"] * 9)
        lines.append(f"a{level}: &a{level} [{aliases}]")
    return "\n".join(lines) + "\n"


# Each YAML surprise as a file's text and as an override, with what its refusal says.
YAML_SURPRISES = {
    "alias bomb": (_billion_laughs(), "model=" + "{a: &a [1, 1], b: [*a, *a]}", "anchors"),
    "recursive alias": ("train: &a [*a]\n", "train.lr=&a [*a]", "anchors and aliases"),
    "repeated section": (
        "train:\n  epochs: 3\nmodel:\n  channels: 8\ntrain:\n  lr: 0.1\n",
        "train={epochs: 3, epochs: 4}",
        "given twice in one mapping",
    ),
    "octal": ("train:\n  epochs: 010\n", "train.epochs=010", "010 is the octal number 8"),
    "yes": ("train:\n  compile: yes\n", "train.compile=yes", "yes is true to YAML 1.1"),
    "off": ("train:\n  compile: off\n", "train.compile=Off", "to YAML 1.1, text to YAML 1.2"),
    "base 60": ("train:\n  epochs: 1:30\n", "train.epochs=1:30", "the base-60 number 90"),
    "underscores": ("train:\n  lr: 1_0.5\n", "train.epochs=1_000", "groups digits with _"),
    "merge key": ("train:\n  <<: {epochs: 3}\n", "train={<<: {epochs: 3}}", "merge keys"),
}


@pytest.mark.parametrize("surprise", list(YAML_SURPRISES))
def test_yaml_surprises_are_refused_naming_the_file_or_override(surprise: str, tmp_path: Path):
    text, override, message = YAML_SURPRISES[surprise]
    path = tmp_path / "surprise.yaml"
    path.write_text(text)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"config file .*surprise\.yaml, line \d+: .*{message}"):
        load_config(path)
    value = re.escape(override[:20])
    with pytest.raises(ConfigError, match=rf"the value of override '{value}.*': .*{message}"):
        load_config(overrides=[override])
    assert time.perf_counter() - started < 1  # refused before anything expands


def test_text_that_yaml_1_1_would_misread_round_trips_as_text(tmp_path: Path):
    labels = ["yes", "no", "on", "010", "1:30", "1_000", "2024-01-01", "0x10", "y", "n"]
    config = load_config(overrides=["data.cache_dir=2024-01-01", "sample.labels=[side=no]"])
    config = dataclasses.replace(
        config, prior=dataclasses.replace(config.prior, condition_labels=tuple(labels))
    )
    assert config.data.cache_dir == "2024-01-01" and config.sample.labels == ("side=no",)
    save_config(config, tmp_path / "config.yaml")
    assert "&" not in (tmp_path / "config.yaml").read_text()
    assert load_config(tmp_path / "config.yaml") == config


def test_every_yaml_the_tool_reads_goes_through_the_strict_loader():
    source = Path(__file__).parent.parent / "src" / "mri_vqvae"
    readers = re.compile(r"yaml\.(safe_load|load|full_load|unsafe_load|\w+_all)\(|Loader=")
    found = [
        f"{path.name}: {line.strip()}"
        for path in sorted(source.rglob("*.py"))
        for line in path.read_text().splitlines()
        if readers.search(line)
    ]
    assert found == ["config.py: return yaml.load(text, Loader=StrictLoader)"]


def test_both_transformer_priors_split_their_width_between_heads():
    for architecture in ("transformer", "masked"):
        with pytest.raises(ConfigError, match=r"prior\.width \(192\) must be divisible by"):
            load_config(overrides=[f"prior.architecture={architecture}", "prior.num_heads=5"])
    assert load_config(overrides=["prior.architecture=pixelcnn", "prior.num_heads=5"])
