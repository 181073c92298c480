"""Named, versioned protocols of the sample measures.

Every setting that changes a figure of ``evaluate-samples`` (the feature networks, the
two-sample classifier, KID, density and coverage, the null test's bounds), or of the
reconstructions' two-sample test that ``evaluate`` shares with it, is fixed under a name,
and the name with its settings is written beside every result. Two figures are comparable
only when their protocols match; a changed setting is a new protocol name, never an edit of
an existing one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mri_vqvae.errors import ConfigError, shown


@dataclass(frozen=True)
class SampleProtocol:
    """The settings of one version of the sample measures."""

    name: str
    # The random-weight feature network: its seed and the widths of its stride-2 stages.
    random_features_seed: int = 0
    random_features_widths: tuple[int, ...] = (16, 32, 64, 64)
    # The autoencoder trained on the training slices: input pooled 4x, so it learns structure
    # (texture finer than that is the random network's part, at full resolution) and trains
    # in about 4 s on two CPU cores; a fixed step count, not a time budget, keeps it frozen.
    autoencoder_pool: int = 4
    autoencoder_widths: tuple[int, ...] = (8, 16, 32)
    autoencoder_steps: int = 200
    autoencoder_batch_size: int = 32
    autoencoder_learning_rate: float = 3e-3
    autoencoder_seed: int = 0
    # Two-sample classifier: L2-penalised logistic regression on the random-network features,
    # stratified folds, each image classified once by the model of the fold that held it out.
    classifier_features: str = "random_cnn"
    classifier_folds: int = 5
    classifier_l2_penalty: float = 1e-2
    classifier_lbfgs_iterations: int = 100
    # A figure is untrustworthy when its null (two random halves of one set) reaches this
    # accuracy, or its 95% interval lies wholly above 0.5.
    null_max_accuracy: float = 0.55
    # The reconstructions' two-sample figure (``evaluate``: reconstructions of one random half
    # of the slices against the other half's real slices) is the mean over this many random
    # halvings; one halving of a small test split is a noisy draw.
    realism_halvings: int = 1
    # KID: unbiased MMD^2 averaged over random subsets, under the cubic polynomial kernel or
    # a Gaussian kernel as wide as the median distance between training reconstructions.
    kid_kernel: str = "cubic"
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    # Density and coverage: k nearest neighbours among the reference features.
    nearest_neighbours: int = 5

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-safe values."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }


# Never edit a protocol that has been released: add a new name instead.
PROTOCOLS: dict[str, SampleProtocol] = {
    "frozen-v1": SampleProtocol(name="frozen-v1"),
    # v2: KID under a bounded kernel, so one outlying sample cannot swing it (distances.py).
    "frozen-v2": SampleProtocol(name="frozen-v2", kid_kernel="gaussian"),
    # v3: the reconstructions' two-sample figure averaged over 10 halvings (on 40 MNI test
    # slices one halving ranged 0.600-0.875 over twenty draws). The sample measures are v2's.
    "frozen-v3": SampleProtocol(name="frozen-v3", kid_kernel="gaussian", realism_halvings=10),
}


# What sample_metrics.protocol is unless set: the newest protocol.
DEFAULT_PROTOCOL = "frozen-v3"


def protocol_named(name: str) -> SampleProtocol:
    """The protocol called ``name``; a ConfigError names the setting and the choices."""
    if name not in PROTOCOLS:
        raise ConfigError(
            f"sample_metrics.protocol must be one of {sorted(PROTOCOLS)}, got {shown(name)}"
        )
    return PROTOCOLS[name]
