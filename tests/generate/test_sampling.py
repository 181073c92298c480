"""Sampling: logit filtering, cached and uncached sampling agreeing exactly, and what
write_samples leaves on disk."""

import json

import pytest
import torch

from mri_vqvae.data.nifti import read_slice
from mri_vqvae.generate.sampling import (
    SampleConfig,
    filter_logits,
    generate_samples,
    load_sample_codes,
    sample_codes,
    write_samples,
)
from mri_vqvae.model import VQVAE
from tests.helpers import NUM_CODES, tiny_model_config, tiny_prior


def test_top_k_keeps_the_k_most_likely_codes():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    kept = filter_logits(logits, top_k=2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, True]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probabilities = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_logits(probabilities.log(), top_p=0.75)
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    # The most likely code survives any p.
    assert torch.isfinite(filter_logits(probabilities.log(), top_p=0.01)).sum() == 1


def test_temperature_scales_logits():
    logits = torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(filter_logits(logits, temperature=0.5), logits * 2)


def test_cached_and_uncached_sampling_draw_identical_codes():
    prior = tiny_prior("transformer", (4, 3))
    cached = sample_codes(
        prior, 5, SampleConfig(batch_size=3), generator=torch.Generator().manual_seed(7)
    )
    uncached = sample_codes(
        prior,
        5,
        SampleConfig(batch_size=3, use_cache=False),
        generator=torch.Generator().manual_seed(7),
    )
    assert cached.shape == (5, 4, 3)
    assert torch.equal(cached, uncached)
    assert cached.min() >= 0 and cached.max() < NUM_CODES


def test_pixelcnn_samples_and_top_k_one_is_greedy():
    prior = tiny_prior("pixelcnn", (4, 3))
    greedy = sample_codes(prior, 2, SampleConfig(top_k=1))
    # Greedy decoding: every code is the argmax given the codes before it.
    logits = prior(greedy)
    assert torch.equal(logits.argmax(dim=1), greedy)


def test_generate_and_write_samples(tmp_path):
    torch.manual_seed(0)
    vqvae = VQVAE.from_config(tiny_model_config(num_embeddings=NUM_CODES)).eval()
    prior = tiny_prior("transformer", (16, 8))
    run = generate_samples(vqvae, prior, 3, seed=1)
    assert run.images.shape == (3, 1, 64, 32)
    assert run.images.abs().max() <= 1
    out = write_samples(run, tmp_path / "samples", {"seed": 1})
    assert (out / "samples.png").is_file()
    assert read_slice(out / "sample_0002.nii.gz").pixels.shape == (64, 32)
    assert torch.equal(load_sample_codes(out / "codes.pt"), run.codes)
    summary = json.loads((out / "samples.json").read_text())
    assert summary["num_samples"] == 3 and summary["grid_shape"] == [16, 8]
    again = generate_samples(vqvae, prior, 3, seed=1)
    assert torch.equal(again.codes, run.codes)
    with pytest.raises(ValueError, match="without slice positions"):
        generate_samples(vqvae, prior, 1, slice_position=0.5)


def test_bad_sampling_settings_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        SampleConfig(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        SampleConfig(top_p=1.5)


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), 0.0, -1.0])
def test_a_temperature_that_is_not_a_finite_positive_number_is_refused(temperature):
    with pytest.raises(ValueError, match=r"sample\.temperature must be a finite number > 0"):
        SampleConfig(temperature=temperature)
