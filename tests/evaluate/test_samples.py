"""evaluate_samples end to end on tiny images: the summary's layout and its protocol."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mri_vqvae.config import Config, SampleMetricsConfig
from mri_vqvae.data.dataset import SliceSet
from mri_vqvae.errors import ConfigError
from mri_vqvae.evaluate.samples import GeneratedSamples, evaluate_samples
from mri_vqvae.model import VQVAE
from mri_vqvae.protocol import PROTOCOLS, protocol_named
from mri_vqvae.records import to_plain
from mri_vqvae.records.samples import SampleMeasures
from mri_vqvae.trained import TrainedVQVAE
from tests.helpers import TINY_SIZE, tiny_model_config


def slice_set(count: int, seed: int) -> SliceSet:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 1, TINY_SIZE[0] // 8, TINY_SIZE[1] // 8, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=TINY_SIZE, mode="bilinear") * 2 - 1
    return SliceSet(
        images=images.half(),
        names=[f"slice_{seed}_{i}.nii.gz" for i in range(count)],
        original_shapes=[TINY_SIZE] * count,
        intensity_ranges=torch.tensor([[0.0, 1.0]] * count),
    )


@pytest.fixture
def quick(monkeypatch):
    """The default protocol with a shorter autoencoder fit and fewer KID subsets (fast; the
    summary must name what was used), a tiny random VQ-VAE, and small settings."""
    default = SampleMetricsConfig().protocol
    protocol = dataclasses.replace(PROTOCOLS[default], autoencoder_steps=10, kid_subsets=10)
    monkeypatch.setitem(PROTOCOLS, default, protocol)
    torch.manual_seed(0)
    model = VQVAE.from_config(tiny_model_config()).eval()
    vqvae = TrainedVQVAE(
        model=model,
        config=Config(model=tiny_model_config()),
        path=Path("vqvae.pt"),
        sha256="0" * 64,
        texture=None,
        data_reference=None,
    )
    settings = SampleMetricsConfig(reference_slices=24, diversity_pairs=20, device="cpu")
    return protocol, vqvae, settings


def measure(samples: GeneratedSamples, train: SliceSet, held_out: SliceSet, vqvae, out, settings):
    return evaluate_samples(
        samples, train=train, held_out=held_out, vqvae=vqvae, out_dir=out, settings=settings
    )


def test_the_summary_carries_the_protocol_and_every_figure_beside_its_null(tmp_path: Path, quick):
    quick, vqvae, settings = quick
    default = SampleMetricsConfig().protocol
    summary = measure(
        GeneratedSamples(slice_set(12, 0)), slice_set(30, 1), slice_set(12, 2), vqvae, tmp_path,
        settings,
    )  # fmt: skip
    written = json.loads((tmp_path / "sample_metrics.json").read_text())
    assert written == json.loads(summary.to_json())
    assert SampleMeasures.read(tmp_path / "sample_metrics.json") == summary
    assert to_plain(summary.protocol) == quick.to_dict()
    assert summary.protocol.autoencoder_steps == 10
    assert summary.protocol.classifier_folds == 5
    assert summary.settings.protocol == default == "frozen-v3"
    assert summary.num_train_reconstructed == 24
    comparisons = (
        "samples_vs_train_reconstructions",
        "null_train_halves",
        "shift_train_vs_held_out_reconstructions",
        "samples_vs_held_out_reconstructions",
        "samples_vs_held_out_real",
    )
    two_sample = summary.two_sample
    assert isinstance(two_sample.trustworthy, bool)
    assert two_sample.null_train_halves.images_per_set == 12
    assert [name for name, _, _ in two_sample.by_comparison()] == list(comparisons)
    for space in ("random_cnn", "autoencoder"):
        kid = summary.kid[space]
        assert [name for name, _, _ in kid.by_comparison()] == list(comparisons)
        assert all(d.mean == d.mean for _, _, d in kid.by_comparison())  # no NaN
        assert [n for n, _, _ in summary.density_coverage[space].by_comparison()] == list(
            comparisons
        )
        assert kid.null_level > 0
        assert kid.kernel == "gaussian"
        assert kid.kernel_width > 0
    for _, _, test in two_sample.by_comparison():
        assert 0 <= test.accuracy <= 1
    targets = summary.targets
    assert "two_sample_vs_train_reconstructions_at_most_0.65" in targets
    assert "kid_autoencoder_at_most_2x_null" in targets
    assert all(isinstance(value, bool) for value in targets.values())
    assert (tmp_path / "memorisation.csv").is_file()
    assert summary.texture.samples_textured is False
    assert summary.texture.against_reconstructions is None


def test_an_unknown_protocol_is_a_config_error_naming_the_setting():
    with pytest.raises(ConfigError, match=r"sample_metrics\.protocol must be one of"):
        SampleMetricsConfig(protocol="c2st-v0")
    with pytest.raises(ConfigError, match=r"sample_metrics\.protocol"):
        protocol_named("c2st-v0")
    with pytest.raises(ConfigError, match=r"sample_metrics\.reference_slices"):
        SampleMetricsConfig(reference_slices=1)


def test_every_protocol_is_a_valid_setting_and_the_default_is_one_of_them():
    from mri_vqvae.protocol import DEFAULT_PROTOCOL

    for name, protocol in PROTOCOLS.items():
        assert SampleMetricsConfig(protocol=name).measures == protocol
        assert name == protocol.name
    assert SampleMetricsConfig().protocol == DEFAULT_PROTOCOL in PROTOCOLS


def test_a_copied_training_slice_is_found_behind_its_texture():
    from mri_vqvae.evaluate.samples import Nearest
    from mri_vqvae.model.texture import ResidualTexture

    train = slice_set(20, 3)
    settings = SampleMetricsConfig(neighbour_candidates=20)
    copy = train.images[5:6].float()  # a "sample" that is training slice 5, decoded smooth
    noisy = copy + 0.6 * torch.randn(copy.shape, generator=torch.Generator().manual_seed(0))
    texture = ResidualTexture.fit(
        noisy.clamp(-1, 1).expand(4, -1, -1, -1), copy.expand(4, -1, -1, -1)
    )
    textured = texture.sample(copy, torch.Generator().manual_seed(1))  # what the file holds
    by_file = Nearest.of(textured, copy, train, settings)
    assert by_file.samples[0] < 0.95  # the noise alone would hide the copy
    both = by_file.or_closer(copy, train, settings)
    assert both.samples[0] > 0.99 and int(both.sample_index[0]) == 5
    # Never weaker than the file alone, whatever the other rendering is.
    other = by_file.or_closer(-torch.ones_like(copy), train, settings)
    assert (other.samples >= by_file.samples).all()


def test_textured_samples_meet_reconstructions_as_their_mean_and_real_slices_as_written(
    tmp_path: Path, quick
):
    from mri_vqvae.model.texture import ResidualTexture

    _, vqvae, settings = quick
    train, held_out = slice_set(30, 1), slice_set(12, 2)
    from mri_vqvae.evaluate.samples import reconstruct

    plain, _ = reconstruct(vqvae.model, train.images[:12], torch.device("cpu"))
    # Files far from anything real (a flat grey), whose codes decode to training slices.
    written = dataclasses.replace(slice_set(12, 0), images=torch.zeros(12, 1, *TINY_SIZE).half())
    texture = ResidualTexture.fit(plain + 0.05 * torch.randn(plain.shape), plain)
    samples = GeneratedSamples(written, texture=texture, plain=plain)
    summary = measure(samples, train, held_out, vqvae, tmp_path, settings)
    two_sample = summary.two_sample
    # Against reconstructions the decoded mean counts: like the training reconstructions.
    assert two_sample.samples_vs_train_reconstructions.accuracy < 0.8
    assert summary.texture.against_real_slices == "the sample files, texture and all"
    # Against real slices the files count: with a decoded mean that is the held-out slices
    # themselves, the flat grey files are still told from them at once.
    samples = GeneratedSamples(written, texture=texture, plain=held_out.images.float())
    summary = measure(samples, train, held_out, vqvae, tmp_path / "real", settings)
    assert summary.two_sample.samples_vs_held_out_real.accuracy > 0.9
    # Without the codes' decoded mean, the files meet reconstructions given the texture too.
    summary = measure(
        GeneratedSamples(written, texture=texture), train, held_out, vqvae, tmp_path / "files",
        settings,
    )  # fmt: skip
    assert summary.texture.against_reconstructions.startswith("the sample files")
    assert summary.texture.memorisation_searched_with == "the files alone"
