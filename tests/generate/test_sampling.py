"""Sampling: logit filtering, cached and uncached sampling agreeing exactly, the masked prior's
parallel decoding, classifier-free guidance, conditions drawn from training, and what
write_samples leaves on disk."""

import json
import math
from dataclasses import replace

import pytest
import torch

from mri_vqvae.checkpoint import PriorExtras, TrainingConditions
from mri_vqvae.code_maps import load_sample_codes
from mri_vqvae.config import SampleConfig
from mri_vqvae.data.nifti import read_slice
from mri_vqvae.generate.conditions import draw_conditions
from mri_vqvae.generate.samples import draw_samples, generate_samples, write_samples
from mri_vqvae.generate.sampling import _guided, decode_masked, filter_logits, sample_codes
from mri_vqvae.model.prior import ConditionSizes, PriorConditions
from mri_vqvae.trained import TrainedPrior, TrainedVQVAE
from tests.helpers import NUM_CODES, positions, tiny_model_files, tiny_prior


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
    exact = SampleConfig(batch_size=3, precision="float32")
    cached = sample_codes(prior, 5, exact, generator=torch.Generator().manual_seed(7))
    uncached = sample_codes(
        prior, 5, replace(exact, use_cache=False), generator=torch.Generator().manual_seed(7)
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
    vqvae_path, prior_path = tiny_model_files(tmp_path, {})
    vqvae = TrainedVQVAE.load(vqvae_path)
    prior = TrainedPrior.load(prior_path, vqvae=vqvae)
    settings = SampleConfig(num_samples=3, seed=1)
    run = draw_samples(vqvae=vqvae, prior=prior, settings=settings)
    assert run.images.shape == (3, 1, 64, 32)
    assert run.images.abs().max() <= 1
    out = write_samples(run, tmp_path / "samples", vqvae.data_reference)
    assert (out / "samples.png").is_file()
    assert read_slice(out / "sample_0002.nii.gz").pixels.shape == (64, 32)
    assert torch.equal(load_sample_codes(out / "codes.pt"), run.codes)
    summary = json.loads((out / "samples.json").read_text())
    assert summary["num_samples"] == 3 and summary["grid_shape"] == [16, 8]
    assert summary["vqvae_sha256"] == vqvae.sha256 and summary["seed"] == 1
    again = generate_samples(vqvae=vqvae, prior=prior.model, settings=settings)
    assert torch.equal(again.codes, run.codes)
    with pytest.raises(ValueError, match="without conditions"):
        generate_samples(
            vqvae=vqvae,
            prior=prior.model,
            settings=SampleConfig(num_samples=1),
            conditions=positions(0.5),
        )


def test_bad_sampling_settings_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        SampleConfig(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        SampleConfig(top_p=1.5)


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), 0.0, -1.0])
def test_a_temperature_that_is_not_a_finite_positive_number_is_refused(temperature):
    with pytest.raises(ValueError, match=r"sample\.temperature must be a finite number > 0"):
        SampleConfig(temperature=temperature)


def test_parallel_decoding_fills_every_position_and_keeps_known_codes():
    prior = tiny_prior("masked", (4, 3))
    masked = torch.full((3, 4, 3), prior.mask_token)
    for steps in (1, 2, 8):
        codes = decode_masked(prior, masked, SampleConfig(decoding_steps=steps))
        assert codes.shape == (3, 4, 3)
        assert codes.min() >= 0 and codes.max() < NUM_CODES  # no mask token left
    known = torch.randint(0, NUM_CODES, (2, 4, 3))
    assert torch.equal(decode_masked(prior, known, SampleConfig()), known)
    partly = known.clone()
    partly[:, 1:3] = prior.mask_token
    filled = decode_masked(prior, partly, SampleConfig(decoding_steps=3))
    assert torch.equal(filled[:, [0, 3]], known[:, [0, 3]])
    assert (filled[:, 1:3] != prior.mask_token).all()


def test_parallel_decoding_runs_one_forward_per_step():
    prior = tiny_prior("masked", (4, 3))
    calls = []
    prior.register_forward_hook(lambda *args: calls.append(1))
    masked = torch.full((2, 4, 3), prior.mask_token)
    for steps in (2, 6):
        calls.clear()
        decode_masked(prior, masked, SampleConfig(decoding_steps=steps))
        assert len(calls) == steps  # fewer steps, fewer forwards: faster
    # Sampling from a masked prior goes through the same decoding.
    drawn = sample_codes(prior, 5, SampleConfig(batch_size=2, decoding_steps=3))
    assert drawn.shape == (5, 4, 3) and drawn.max() < NUM_CODES


def test_guidance_one_is_conditional_and_zero_unconditional():
    prior = tiny_prior("masked", (4, 3), conditional=True)
    for parameter in prior.condition.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    codes = torch.randint(0, NUM_CODES, (2, 4, 3))
    conditions = positions(0.1, 0.8)
    conditional = prior(codes, conditions)
    unconditional = prior(codes, conditions.without_guided())
    for weight, expected in ((1.0, conditional), (0.0, unconditional)):
        given, copies, combine = _guided(conditions, weight)
        torch.testing.assert_close(combine(prior(codes.repeat(copies, 1, 1), given)), expected)
    given, copies, combine = _guided(conditions, 3.0)
    assert copies == 2
    guided = combine(prior(codes.repeat(2, 1, 1), given))
    torch.testing.assert_close(guided, unconditional + 3 * (conditional - unconditional))


def test_guided_raster_sampling_draws_valid_codes():
    prior = tiny_prior("transformer", (4, 3), conditional=True)
    settings = SampleConfig(guidance=2.0, batch_size=2)
    codes = sample_codes(prior, 3, settings, positions(0.1, 0.5, 0.9))
    assert codes.shape == (3, 4, 3) and codes.max() < NUM_CODES


def extras_with(sizes, vocabulary=(), conditions=None) -> PriorExtras:
    """A prior checkpoint's record of what it is conditioned on (the rest made up)."""
    return PriorExtras(
        NUM_CODES, (4, 3), "0" * 64, "vqvae.pt", sizes, vocabulary,
        conditions or TrainingConditions(),
    )  # fmt: skip


def test_conditions_not_given_are_drawn_from_training():
    extras = extras_with(
        ConditionSizes(position=True, labels=(2,), augmentation=3),
        (("orientation", ("axial", "coronal")),),
        TrainingConditions(torch.tensor([0.25, 0.75]), torch.tensor([[1], [2]])),
    )
    generator = torch.Generator().manual_seed(0)
    drawn = draw_conditions(extras, 200, generator)
    # Drawn jointly: position 0.25 always comes with axial, 0.75 with coronal.
    pairs = set(zip(drawn.position.tolist(), drawn.labels[:, 0].tolist(), strict=True))
    assert pairs == {(0.25, 1), (0.75, 2)}
    assert not drawn.augmentation.any()
    given = draw_conditions(extras, 4, generator, 0.5, {"orientation": "coronal"})
    assert given.position.tolist() == [0.5] * 4 and given.labels[:, 0].tolist() == [2] * 4
    with pytest.raises(ValueError, match=r"no value 'sagittal'.*axial, coronal"):
        draw_conditions(extras, 1, generator, labels={"orientation": "sagittal"})
    with pytest.raises(ValueError, match="no label 'case'"):
        draw_conditions(extras, 1, generator, labels={"case": "a"})
    plain = extras_with(ConditionSizes())
    assert draw_conditions(plain, 3, generator) is None
    with pytest.raises(ValueError, match=r"without slice positions.*sample\.slice_position"):
        draw_conditions(plain, 3, generator, 0.5)
    with pytest.raises(ValueError, match=r"without labels.*sample\.labels"):
        draw_conditions(plain, 3, generator, labels={"orientation": "axial"})
    assert isinstance(drawn, PriorConditions)


def test_drawn_conditions_agree_with_the_given_ones():
    extras = extras_with(
        ConditionSizes(position=True, labels=(2,)),
        (("orientation", ("axial", "sagittal")),),
        TrainingConditions(torch.linspace(0, 1, 40), torch.tensor([1] * 20 + [2] * 20)[:, None]),
    )
    generator = torch.Generator().manual_seed(0)
    # Given the label, positions come from that label's slices only (the second half).
    sagittal = draw_conditions(extras, 100, generator, labels={"orientation": "sagittal"})
    assert sagittal.position.min() >= 0.5 and set(sagittal.labels[:, 0].tolist()) == {2}
    # Given the position, the labels come from the slices nearest to it.
    near_start = draw_conditions(extras, 100, generator, slice_position=0.0)
    assert set(near_start.labels[:, 0].tolist()) == {1}
    assert near_start.position.tolist() == [0.0] * 100


def test_a_prior_on_augmentation_alone_samples_with_none():
    extras = extras_with(ConditionSizes(augmentation=7))
    drawn = draw_conditions(extras, 5, torch.Generator().manual_seed(0))
    assert drawn.position is None and drawn.labels is None
    assert drawn.augmentation.shape == (5, 7) and not drawn.augmentation.any()


def test_a_partly_known_map_is_filled_on_the_schedule_of_its_unknown_codes():
    from mri_vqvae.generate.sampling import _still_unknown

    unknown = torch.zeros(1, 1024, dtype=torch.bool)
    unknown[0, :100] = True
    initially = unknown.sum(dim=1)
    left = []
    for step in range(12):
        count = int(_still_unknown(unknown, initially, step, 12))
        left.append(count)
        unknown = torch.zeros_like(unknown)
        unknown[0, :count] = True
    # The cosine schedule over the 100 unknown codes, not over the whole map.
    expected = [math.floor(100 * math.cos(math.pi / 2 * (s + 1) / 12) + 1e-9) for s in range(11)]
    assert left == [*expected, 0]


def test_bfloat16_sampling_draws_valid_codes_with_either_prior():
    settings = SampleConfig(batch_size=2, precision="bfloat16", decoding_steps=3)
    for architecture in ("transformer", "masked"):
        codes = sample_codes(tiny_prior(architecture, (4, 3)), 3, settings)
        assert codes.shape == (3, 4, 3) and codes.min() >= 0 and codes.max() < NUM_CODES


def test_sampler_settings_are_checked():
    with pytest.raises(ValueError, match=r"sample\.labels gives side more than once"):
        SampleConfig(labels=("side=left", "side =right"))
    assert SampleConfig(labels=(" side = left ",)).label_values() == {"side": "left"}
    with pytest.raises(ValueError, match=r"sample\.guidance must be a finite number"):
        SampleConfig(guidance=float("inf"))
