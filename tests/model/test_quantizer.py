import pytest
import torch

from mri_vqvae.model.quantizer import VectorQuantizer, kmeans


def quantizer(codebook: torch.Tensor, update: str = "loss", decay: float = 0.9) -> VectorQuantizer:
    vq = VectorQuantizer(
        codebook.shape[0], codebook.shape[1], 0.25, update, decay, 1e-5, codebook_init="uniform"
    )
    vq.codebook.data.copy_(codebook)
    vq.ema_embedding_sum.copy_(codebook)
    return vq


def as_latents(vectors: torch.Tensor) -> torch.Tensor:
    """(N, D) vectors to (1, D, 1, N) latents."""
    return vectors.t()[None, :, None, :].contiguous()


CODES = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])


def test_nearest_code_by_euclidean_distance():
    vectors = torch.tensor([[0.9, 0.1], [0.1, 0.2], [-0.7, -0.9], [0.2, 1.3], [0.6, 0.0]])
    output = quantizer(CODES)(as_latents(vectors))
    assert output.indices.flatten().tolist() == [1, 0, 3, 2, 1]
    torch.testing.assert_close(output.quantized[0, :, 0, :].t(), CODES[[1, 0, 3, 2, 1]])


def test_straight_through_gradient_reaches_the_latents():
    latents = torch.randn(2, 2, 3, 3, requires_grad=True)
    output = quantizer(CODES)(latents)
    (output.quantized * torch.arange(2.0).view(1, 2, 1, 1)).sum().backward()
    torch.testing.assert_close(latents.grad, torch.arange(2.0).view(1, 2, 1, 1).expand(2, 2, 3, 3))


def test_loss_is_codebook_plus_beta_commitment():
    vectors = torch.tensor([[0.9, 0.1], [0.1, 0.2]])
    output = quantizer(CODES, "loss")(as_latents(vectors))
    squared = ((vectors - CODES[[1, 0]]) ** 2).mean()
    torch.testing.assert_close(output.commitment_loss, squared)
    torch.testing.assert_close(output.codebook_loss, squared)
    torch.testing.assert_close(output.loss, squared * 1.25)


def test_codebook_loss_trains_only_the_codebook_and_commitment_only_the_encoder():
    vq = quantizer(CODES, "loss")
    latents = as_latents(torch.tensor([[0.9, 0.1]])).requires_grad_()
    output = vq(latents)
    output.codebook_loss.backward(retain_graph=True)
    assert latents.grad is None or latents.grad.abs().sum() == 0
    assert vq.codebook.grad[1].abs().sum() > 0 and vq.codebook.grad[[0, 2, 3]].abs().sum() == 0


def test_ema_step_matches_a_hand_computation():
    decay = 0.9
    vq = quantizer(CODES, "ema", decay).train()
    vectors = torch.tensor([[0.8, 0.0], [1.2, 0.2], [-0.1, 0.1]])  # codes 1, 1, 0
    output = vq(as_latents(vectors))
    assert output.indices.flatten().tolist() == [1, 1, 0]
    assert output.codebook_loss == 0
    cluster = torch.tensor([1.0, 1.0, 1.0, 1.0]) * decay + (1 - decay) * torch.tensor([1, 2, 0, 0])
    sums = CODES * decay
    sums[1] += (1 - decay) * (vectors[0] + vectors[1])
    sums[0] += (1 - decay) * vectors[2]
    total = cluster.sum()
    smoothed = (cluster + 1e-5) / (total + 4 * 1e-5) * total
    torch.testing.assert_close(vq.ema_cluster_size, cluster)
    torch.testing.assert_close(vq.codebook.data, sums / smoothed[:, None])
    # Assigned codes moved toward their vectors; unassigned ones stayed (up to smoothing).
    assert (vq.codebook[1] - torch.tensor([1.0, 0.1])).norm() < (
        CODES[1] - torch.tensor([1.0, 0.1])
    ).norm()
    torch.testing.assert_close(vq.codebook.data[2:], CODES[2:], atol=1e-4, rtol=0)


def test_ema_codebook_converges_to_cluster_means():
    torch.manual_seed(0)
    centres = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, -2.0]])
    vq = quantizer(centres + 0.5 * torch.randn(3, 2), "ema", 0.8).train()
    for _ in range(60):
        vectors = centres.repeat(50, 1) + 0.1 * torch.randn(150, 2)
        vq(as_latents(vectors))
    torch.testing.assert_close(vq.codebook.data, centres, atol=0.05, rtol=0)


def test_perplexity_of_known_index_sets():
    vq = quantizer(CODES)
    all_one = vq(as_latents(CODES[[1, 1, 1, 1]]))
    even = vq(as_latents(CODES))
    torch.testing.assert_close(all_one.perplexity, torch.tensor(1.0))
    torch.testing.assert_close(even.perplexity, torch.tensor(4.0))


def test_wrong_latent_width_is_refused():
    with pytest.raises(ValueError, match="3 channels"):
        quantizer(CODES)(torch.randn(1, 3, 2, 2))


CENTRES = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, 0.0], [0.0, -4.0]])


def pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact (A, B) Euclidean distances (torch.cdist's matmul form rounds at this scale)."""
    return (a[:, None] - b[None]).norm(dim=-1)


def clustered(per_cluster: int, spread: float = 0.1) -> torch.Tensor:
    return CENTRES.repeat(per_cluster, 1) + spread * torch.randn(4 * per_cluster, 2)


def test_kmeans_places_one_code_on_each_data_cluster():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, codebook_init="kmeans").train()
    assert not vq.initialized
    vectors = clustered(50)
    vq(as_latents(vectors))
    assert vq.initialized
    # Every centre has a code next to it: the four codes sit on the four clusters.
    nearest = pairwise_distances(CENTRES, vq.codebook.data)
    assert nearest.min(dim=1).values.max() < 0.1
    assert sorted(nearest.argmin(dim=1).tolist()) == [0, 1, 2, 3]
    # The EMA statistics agree with the placed codes, so the next step does not undo them.
    torch.testing.assert_close(
        vq.ema_embedding_sum / vq.ema_cluster_size[:, None], vq.codebook.data
    )


def test_kmeans_init_waits_for_training_mode():
    vq = VectorQuantizer(4, 2, codebook_init="kmeans").eval()
    before = vq.codebook.data.clone()
    vq(as_latents(clustered(5)))
    assert not vq.initialized
    torch.testing.assert_close(vq.codebook.data, before, rtol=0, atol=0)


def test_kmeans_with_fewer_vectors_than_codes_still_places_every_code_on_data():
    torch.manual_seed(0)
    centres, sizes = kmeans(CENTRES, 6)
    assert centres.shape == (6, 2) and sizes.sum() == 4
    assert pairwise_distances(centres, CENTRES).min(dim=1).values.max() < 1e-6


def test_an_unused_code_is_restarted_on_a_batch_latent():
    torch.manual_seed(0)
    codes = torch.cat([CENTRES, torch.tensor([[100.0, 100.0]])])  # code 4 is never nearest
    vq = VectorQuantizer(5, 2, codebook_init="uniform", dead_code_steps=3).train()
    vq._set_codes(torch.arange(5), codes, torch.ones(5))
    vectors = clustered(10)
    for step in range(1, 4):
        vq(as_latents(vectors))
        if step < 3:
            assert vq.steps_unused[4] == step and vq.restart_count == 0
    assert vq.restart_count == 1 and vq.steps_unused[4] == 0
    # The dead code now sits exactly on one of the batch's latents; the live ones stayed put.
    assert pairwise_distances(vq.codebook.data[4:], vectors).min() < 1e-6
    assert pairwise_distances(vq.codebook.data[:4], CENTRES).diagonal().max() < 0.1
    # And it is picked from then on.
    assert 4 in vq(as_latents(vectors)).indices.unique().tolist()


def test_restarts_are_off_with_zero_steps():
    vq = VectorQuantizer(5, 2, codebook_init="uniform", dead_code_steps=0).train()
    vq._set_codes(
        torch.arange(5), torch.cat([CENTRES, torch.tensor([[100.0, 100.0]])]), torch.ones(5)
    )
    for _ in range(5):
        vq(as_latents(clustered(10)))
    assert vq.restart_count == 0
    # Only Laplace smoothing moves it, by a few parts per million.
    torch.testing.assert_close(vq.codebook.data[4], torch.tensor([100.0, 100.0]), rtol=1e-4, atol=0)


def test_cosine_codes_compare_directions_and_return_unit_vectors():
    vq = VectorQuantizer(4, 2, codebook_init="uniform", cosine_codes=True).eval()
    vq.codebook.data.copy_(CENTRES * torch.tensor([[1.0], [0.1], [3.0], [1.0]]))
    vectors = torch.tensor([[10.0, 1.0], [0.0, 0.01], [-0.2, 0.0]])
    output = vq(as_latents(vectors))
    # By angle, whatever the lengths: east, north, west.
    assert output.indices.flatten().tolist() == [0, 1, 2]
    torch.testing.assert_close(output.quantized.norm(dim=1), torch.ones(1, 1, 3))
