"""files.py: the stamped cache every derived file goes through."""

from pathlib import Path

import torch

from mri_vqvae.files import read_stamped, write_stamped


def test_a_stamped_cache_is_read_only_with_its_stamp(tmp_path: Path):
    path = tmp_path / "cache" / "codes.pt"
    write_stamped(path, {"format": 1, "sha": "abc"}, {"indices": torch.arange(3)})
    assert torch.equal(read_stamped(path, {"format": 1, "sha": "abc"})["indices"], torch.arange(3))
    assert read_stamped(path, {"format": 1, "sha": "abd"}) is None  # other inputs
    assert read_stamped(tmp_path / "missing.pt", {"format": 1}) is None
    path.write_bytes(b"damaged")
    assert read_stamped(path, {"format": 1, "sha": "abc"}) is None  # never trusted
    assert not list(path.parent.glob(".*tmp*")), "temporary file left behind"
