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


def test_a_folder_holding_only_the_tools_marker_being_written_counts_as_empty(tmp_path: Path):
    # Under torchrun the main process marks a new run folder (through a temporary file) while
    # the others check it: that temporary is the tool's own, not a user's file.
    import pytest

    from mri_vqvae.files import MARKER_FILE, PRIOR_RUN, OutputError, OutputFolder

    run = tmp_path / "prior"
    run.mkdir()
    (run / f".{MARKER_FILE}.tmp4242").write_text("{}")
    OutputFolder(run, PRIOR_RUN).check()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"holds 1 entries \(notes\.txt\)"):
        OutputFolder(run, PRIOR_RUN).check()
