"""What a command may write, and where: output folders of a known kind, their lock, and the
rules that keep every file a user owns from being overwritten without ``--overwrite``.

A folder this tool writes carries a small marker (``.mri-vqvae.json``) naming its kind, so a
later command can tell its own outputs from a user's files. While a command writes a folder it
holds ``.mri-vqvae.lock``: created atomically (``O_CREAT | O_EXCL``), holding the host, the
process id and its start time, so a second process is refused and a lock left by a killed
process is recognised as stale and taken over.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import logging
import os
import shutil
import socket
import stat
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mri_vqvae import __version__
from mri_vqvae.errors import UserError, shown

logger = logging.getLogger(__name__)

MARKER_FILE = ".mri-vqvae.json"
LOCK_FILE = ".mri-vqvae.lock"
# A lock file still empty after this long was left by a process killed while creating it.
_EMPTY_LOCK_GRACE_SECONDS = 30.0


class OutputError(UserError):
    """An output path cannot be used as asked: it is a file where a folder is needed, holds
    results or a user's files that would be overwritten, or is an input."""


class FolderBusy(OutputError):
    """Another live process holds the folder's lock."""


@dataclass(frozen=True)
class FolderKind:
    """A kind of output folder: its name in messages and the names it writes (files, folders
    or ``fnmatch`` patterns): any of them present means the folder holds results, and
    ``--overwrite`` in a folder of this kind removes these and nothing else."""

    key: str
    title: str
    outputs: tuple[str, ...]
    # Whether --resume can continue the results already there.
    resumable: bool = False
    # Whether --overwrite may write into a non-empty folder that this tool did not write.
    may_write_into_foreign: bool = True
    # Whether --overwrite may replace the results of an earlier command of this kind.
    may_overwrite: bool = True


# Every name the tool writes, defined once: the folder kinds below list them for the
# overwrite rules, RunFolder hands them out as paths, and the report reads them.
BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
CONFIG_FILE = "config.yaml"
METRICS_CSV = "metrics.csv"
METRICS_JSONL = "metrics.jsonl"
TENSORBOARD_FOLDER = "tensorboard"
SSIM_CURVES = "ssim_scores.png"
BATCH_LOSSES = "batch_losses.png"
RECONSTRUCTIONS_FOLDER = "reconstructions"
VALIDATION_FOLDER = "validation"
REPORT_FILE = "report.html"
NLL_CURVES = "nll_curves.png"
PRIOR_SUMMARY = "prior_summary.json"
PRIOR_SAMPLES_FOLDER = "samples"
CODES_FOLDER = "codes"
EVALUATION_SUMMARY = "metrics.json"
PER_IMAGE_METRICS = "per_image_metrics.csv"
EXAMPLES_FILE = "examples.npz"
CODEBOOK_FILE = "codebook.npz"
SAMPLES_SUMMARY = "samples.json"
SAMPLES_GRID = "samples.png"
SAMPLE_CODES = "codes.pt"
SAMPLE_EVALUATION_FOLDER = "evaluation"
SAMPLE_METRICS = "sample_metrics.json"
MEMORISATION_TABLE = "memorisation.csv"
BEST_IMAGE = "best_image.png"
WORST_IMAGE = "worst_image.png"
RANDOM_RECONSTRUCTIONS = "reconstructed_images.png"
POWER_SPECTRUM = "power_spectrum.png"
TEXTURED_RECONSTRUCTIONS = "textured_reconstructions.png"
CLOSEST_TO_TRAINING = "closest_to_training.png"
SAMPLES_WITH_NEAREST = "samples_with_nearest_training.png"
NEAREST_TRAINING_SSIM = "nearest_training_ssim.png"


def ssim_scores_file(split: str) -> str:
    """The SSIM histogram of an evaluated split."""
    return f"ssim_scores_{split}_set.png"


def epoch_picture(epoch: int) -> str:
    """A preview picture of one epoch (reconstructions, or a prior's samples)."""
    return f"epoch_{epoch}.png"


@dataclass(frozen=True)
class RunFolder:
    """A training run's folder (either stage) and the paths of what it holds."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    best_checkpoint = property(lambda self: self.path / BEST_CHECKPOINT)
    last_checkpoint = property(lambda self: self.path / LAST_CHECKPOINT)
    config_file = property(lambda self: self.path / CONFIG_FILE)
    metrics_csv = property(lambda self: self.path / METRICS_CSV)
    metrics_jsonl = property(lambda self: self.path / METRICS_JSONL)
    tensorboard = property(lambda self: self.path / TENSORBOARD_FOLDER)
    ssim_curves = property(lambda self: self.path / SSIM_CURVES)
    batch_losses = property(lambda self: self.path / BATCH_LOSSES)
    reconstructions = property(lambda self: self.path / RECONSTRUCTIONS_FOLDER)
    validation = property(lambda self: self.path / VALIDATION_FOLDER)
    report = property(lambda self: self.path / REPORT_FILE)
    nll_curves = property(lambda self: self.path / NLL_CURVES)
    prior_summary = property(lambda self: self.path / PRIOR_SUMMARY)
    prior_samples = property(lambda self: self.path / PRIOR_SAMPLES_FOLDER)
    codes = property(lambda self: self.path / CODES_FOLDER)


_TRAINING_OUTPUTS = (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    CONFIG_FILE,
    METRICS_CSV,
    METRICS_JSONL,
    TENSORBOARD_FOLDER,
)
VQVAE_RUN = FolderKind(
    "vqvae",
    "VQ-VAE run",
    (
        *_TRAINING_OUTPUTS,
        SSIM_CURVES,
        BATCH_LOSSES,
        RECONSTRUCTIONS_FOLDER,
        VALIDATION_FOLDER,
        REPORT_FILE,
    ),
    resumable=True,
)
PRIOR_RUN = FolderKind(
    "prior",
    "prior run",
    (*_TRAINING_OUTPUTS, NLL_CURVES, PRIOR_SUMMARY, PRIOR_SAMPLES_FOLDER),
    resumable=True,
)
EVALUATION = FolderKind(
    "evaluation",
    "evaluation",
    (
        EVALUATION_SUMMARY,
        PER_IMAGE_METRICS,
        ssim_scores_file("*"),
        BEST_IMAGE,
        WORST_IMAGE,
        RANDOM_RECONSTRUCTIONS,
        POWER_SPECTRUM,
        TEXTURED_RECONSTRUCTIONS,
        EXAMPLES_FILE,
        CODEBOOK_FILE,
    ),
)
SAMPLES = FolderKind(
    "samples",
    "sample folder",
    (SAMPLES_SUMMARY, SAMPLES_GRID, "sample_*.nii.gz", SAMPLE_CODES, SAMPLE_EVALUATION_FOLDER),
    # A sample folder holds exactly the slices its samples.json lists: written among a
    # user's files (a training split, say), synthetic slices would mix with real ones.
    may_write_into_foreign=False,
)
SAMPLE_EVALUATION = FolderKind(
    "sample-evaluation",
    "sample evaluation",
    (
        SAMPLE_METRICS,
        MEMORISATION_TABLE,
        CLOSEST_TO_TRAINING,
        SAMPLES_WITH_NEAREST,
        NEAREST_TRAINING_SSIM,
    ),
)
PHANTOM = FolderKind(
    "phantom",
    "phantom dataset",
    (
        "keras_slices_train",
        "keras_slices_seg_train",
        "keras_slices_validate",
        "keras_slices_seg_validate",
        "keras_slices_test",
        "keras_slices_seg_test",
    ),
    # Phantoms are never written among a user's own files, whatever the flags: the HipMRI
    # layout they share would put synthetic slices beside (or over) real scans.
    may_write_into_foreign=False,
    may_overwrite=False,
)
KINDS = {
    kind.key: kind
    for kind in (VQVAE_RUN, PRIOR_RUN, EVALUATION, SAMPLES, SAMPLE_EVALUATION, PHANTOM)
}
_OWN_FILES = (MARKER_FILE, LOCK_FILE)


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


# A marker's manifest lists every output file (about 40 bytes each): room for a million.
_MAX_JSON_BYTES = 64 << 20


def _read_small_json(path: Path) -> Any:
    """The JSON in ``path`` if it is a regular file (not a link, FIFO or folder) of at most
    64 MiB that parses; None otherwise: a foreign or hostile file is nothing of the tool's."""
    try:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_JSON_BYTES:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def _read_marker(folder: Path) -> dict[str, Any]:
    marker = _read_small_json(folder / MARKER_FILE)
    return marker if isinstance(marker, dict) else {}


def folder_kind(folder: Path) -> FolderKind | None:
    """The kind of output folder its marker names; None for a folder this tool did not mark."""
    kind = _read_marker(folder).get("kind")
    return KINDS.get(kind) if isinstance(kind, str) else None


def _identity(info: os.stat_result) -> tuple[int, int]:
    """What tells a file the tool wrote from one put in its place since: its inode and
    modification time (every output is written to a new inode, then renamed in)."""
    return (info.st_ino, info.st_mtime_ns)


def _output_files(folder: Path, patterns: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Every file (or link) in ``folder`` whose top-level name matches ``patterns``, and
    every file below such a folder (links to folders are not followed), by path relative to
    ``folder``, with its identity; the tool's markers and locks are left out."""
    found: dict[str, tuple[int, int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if _is_own(entry.name) or not _matches(entry.name, patterns):
                continue
            with contextlib.suppress(OSError):
                if not entry.is_dir(follow_symlinks=False):
                    found[entry.name] = _identity(entry.stat(follow_symlinks=False))
                    continue
                with contextlib.suppress(RecursionError):  # a tree too deep to be ours
                    for root, _, files in os.walk(entry.path):
                        for name in files:
                            if not _is_own(name):
                                path = os.path.join(root, name)
                                found[os.path.relpath(path, folder)] = _identity(os.lstat(path))
    return found


def _through_a_link(folder: Path, name: str) -> bool:
    """Whether a folder on the way from ``folder`` to ``folder/name`` is a symbolic link."""
    parts = Path(name).parts
    return any(os.path.islink(folder.joinpath(*parts[:i])) for i in range(1, len(parts)))


def written_outputs(folder: Path) -> dict[str, tuple[int, int]]:
    """The files in ``folder`` (by relative path) that mri-vqvae wrote and nobody has
    replaced or edited since, as its marker's manifest records them; a folder without a
    manifest owns nothing."""
    recorded = _read_marker(folder).get("outputs")
    if not isinstance(recorded, dict):
        return {}
    owned = {}
    for name, identity in recorded.items():
        if not isinstance(name, str) or not isinstance(identity, list):
            continue
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or parts == (".",):
            continue  # an edited manifest names nothing outside the folder
        if _through_a_link(folder, name):
            continue  # a folder moved away and linked back is the user's now
        try:
            present = _identity(os.lstat(folder / name))
        except (OSError, ValueError):
            continue
        if present == tuple(identity):
            owned[name] = present
    return owned


def _prune_empty_folders(folder: Path) -> None:
    """Remove ``folder`` and the folders below it that are empty (bottom up); a folder
    holding anything, a user's file say, stays."""
    with contextlib.suppress(RecursionError):  # a tree too deep to be the tool's: left
        for root, _, _ in os.walk(folder, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(root)


def _is_own(name: str) -> bool:
    """The marker or lock, or the marker's temporary while it is written
    (:func:`replaced_atomically`): another process of a distributed run may list the folder
    just then."""
    return name in _OWN_FILES or any(name.startswith(f".{own}.tmp") for own in _OWN_FILES)


def _user_entries(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not _is_own(p.name))
    except OSError as err:
        raise OutputError(f"{folder}: cannot be listed ({err.strerror or err})") from err


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    from fnmatch import fnmatchcase

    return any(fnmatchcase(name, pattern) for pattern in patterns)


class OutputFolder:
    """An output folder a command is about to write: checked when made (before any work),
    then, inside ``with``, created, locked and marked with its kind.

    Rules: a missing or empty folder is fine. A folder of the same kind that already holds
    results (any of ``kind.outputs``) needs ``overwrite`` (or ``resume``, which the caller
    checks against its checkpoint). A non-empty folder this tool did not write needs
    ``overwrite``, and then nothing in it is deleted, only files with the outputs' names
    replaced; a folder it wrote as another kind, a folder holding an input the outputs would
    replace, and a path that is a file are refused. A phantom goes only into a new or empty
    folder. If the command fails before writing anything, a folder it created is removed.

    Args:
        path: the folder.
        kind: what the command writes there.
        option: the command-line option that named it, for messages (``--out``).
        overwrite: replace earlier results (:meth:`remove_previous_outputs`) and write among
            foreign files.
        resume: the command continues the results already there.
        lock: take the folder's lock (False on the non-main processes of a distributed run).
        inputs: files the command reads; a folder where an output would replace one is refused.
    """

    def __init__(
        self,
        path: str | Path,
        kind: FolderKind,
        option: str = "--out",
        overwrite: bool = False,
        resume: bool = False,
        lock: bool = True,
        inputs: tuple[Path, ...] = (),
    ) -> None:
        self.path = Path(path)
        self.inputs = tuple(inputs)
        self.kind = kind
        self.option = option
        self.overwrite = overwrite
        self.resume = resume
        self._lock = FolderLock(self.path) if lock else None
        self._created = False
        # The folder's entries when the command began, to tell what it wrote at the end.
        self._before: dict[str, tuple[int, int]] = {}
        self._recorded_at = time.monotonic()
        self._recording = False
        self._warned = False
        self.check()

    @classmethod
    def for_run(
        cls,
        path: str | Path,
        kind: FolderKind,
        *,
        resume: bool,
        overwrite: bool,
        lock: bool = True,
        inputs: tuple[Path, ...] = (),
    ) -> OutputFolder:
        """A training run's folder: a new one, one replaced with ``overwrite``, or the run
        there continued with ``resume`` (which must find its ``last.pt``)."""
        if resume and overwrite:
            raise OutputError("--resume continues the run in --out; --overwrite would replace it")
        folder = cls(path, kind, overwrite=overwrite, resume=resume, lock=lock, inputs=inputs)
        last = RunFolder(Path(path)).last_checkpoint
        if resume and not last.exists():
            raise OutputError(f"--resume: {path} holds no run to continue ({last} missing)")
        return folder

    def _previous_outputs(self) -> list[Path]:
        """What an earlier command of this kind left here: entries named like its outputs."""
        if not self.path.is_dir():
            return []
        return [p for p in _user_entries(self.path) if _matches(p.name, self.kind.outputs)]

    def describe(self) -> str:
        return f"{self.option} {self.path}"

    def check(self) -> None:
        """Raise :class:`OutputError` if the command may not write this folder as asked."""
        path = self.path
        if path.is_symlink() and not path.exists():
            raise OutputError(f"{self.describe()}: is a symbolic link to nothing")
        if path.exists() and not path.is_dir():
            raise OutputError(
                f"{self.describe()}: is a file; {self.option} names the folder to write "
                f"the {self.kind.title} into"
            )
        if not path.exists():
            return
        self._refuse_linked_output_folders()
        if self.resume:
            return
        entries = _user_entries(path)
        if not entries:
            return
        self._check_inputs()
        found = folder_kind(path)
        if found is not None and found is not self.kind:
            # The tool's own outputs of another kind (a VQ-VAE run, say) are never written
            # over by this command, whatever the flags.
            raise OutputError(
                f"{self.describe()}: is {_a(found.title)} of mri-vqvae; {_a(self.kind.title)} "
                f"goes in a folder of its own (for example {path / self.kind.key})"
            )
        if found is None:
            self._check_foreign(entries)
            return
        previous = self._previous_outputs()
        if previous and not (self.overwrite and self.kind.may_overwrite):
            resume = "--resume to continue it, " if self.kind.resumable else ""
            replace = (
                f"pass {resume}--overwrite to replace it, or choose another {self.option}"
                if self.kind.may_overwrite
                else f"{_a(self.kind.title)} is only written into a new or empty folder"
            )
            shown = ", ".join(p.name for p in previous[:4]) + (" ..." if len(previous) > 4 else "")
            raise OutputError(
                f"{self.describe()}: already holds {_a(self.kind.title)} ({shown}); {replace}"
            )

    def _check_foreign(self, entries: list[Path]) -> None:
        """A non-empty folder this tool did not write: only with ``overwrite``, for a kind
        that may write among a user's files (warned once)."""
        if self.overwrite and self.kind.may_write_into_foreign:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "--overwrite: writing the %s into %s, which mri-vqvae did not write; its "
                    "files named like the outputs will be replaced",
                    *(self.kind.title, self.path),
                )
            return
        listed = ", ".join(p.name for p in entries[:4]) + (" ..." if len(entries) > 4 else "")
        advice = (
            "choose a new or empty folder, or pass --overwrite to write into it (its files "
            "named like the outputs are then replaced)"
            if self.kind.may_write_into_foreign
            else f"{_a(self.kind.title)} is only written into a new or empty folder"
        )
        raise OutputError(
            f"{self.describe()}: holds {len(entries)} entries ({listed}) and is not a folder "
            f"mri-vqvae wrote; {advice}"
        )

    def _refuse_linked_output_folders(self) -> None:
        """Refuse, before any work, a link named like an output that leads to a folder: the
        outputs written below it would land outside this folder."""
        for entry in _user_entries(self.path):
            if entry.is_symlink() and entry.is_dir() and _matches(entry.name, self.kind.outputs):
                raise OutputError(
                    f"{entry}: is a symbolic link to a folder where mri-vqvae writes an output "
                    "folder; outputs are never written through links (remove the link, or "
                    f"choose another {self.option})"
                )

    def _check_inputs(self) -> None:
        """Refuse a folder where writing this kind's outputs would replace an input."""
        for source in self.inputs:
            source = Path(source)
            if _matches(source.name, self.kind.outputs) and _same_file(
                self.path / source.name, source
            ):
                raise OutputError(
                    f"{self.describe()}: holds the input {source}, which this command would "
                    f"write over; choose another {self.option}"
                )

    def __enter__(self) -> OutputFolder:
        _OUTPUT_ROOTS.append(os.path.abspath(self.path))
        try:
            self._enter()
        except BaseException:
            _OUTPUT_ROOTS.remove(os.path.abspath(self.path))
            raise
        if self._lock is not None:
            _ACTIVE[os.path.abspath(self.path)] = self
        return self

    def record_now_and_then(self) -> None:
        """Bring the manifest up to date if it was last written long enough ago (called as
        outputs are written, so a command killed outright leaves its files known)."""
        if self._recording or time.monotonic() - self._recorded_at < _RECORD_EVERY_SECONDS:
            return  # (writing the marker itself comes back here)
        self._recording = True
        try:
            self._record_outputs()
        finally:
            self._recording = False

    def _enter(self) -> OutputFolder:
        if not self.path.exists():
            try:
                self.path.mkdir(parents=True)
                self._created = True
            except FileExistsError:  # another process of a distributed run made it first
                pass
            except OSError as err:
                raise OutputError(
                    f"{self.describe()}: cannot create the folder ({err.strerror or err})"
                ) from err
        if self._lock is not None:
            self._lock.acquire()
            try:
                self.check()  # again: another process may have written it since
                self._write_marker()
                self._before = _output_files(self.path, self.kind.outputs)
            except BaseException:
                self._lock.release()
                raise
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        with contextlib.suppress(ValueError):
            _OUTPUT_ROOTS.remove(os.path.abspath(self.path))
        if _ACTIVE.get(os.path.abspath(self.path)) is self:
            del _ACTIVE[os.path.abspath(self.path)]
        if self._lock is not None:
            try:
                self._record_outputs()
            finally:
                self._lock.release()
        if exc_type is not None and self._created:
            # Nothing of the user's was in a folder this command created: leave no empty one.
            try:
                if not _user_entries(self.path):
                    shutil.rmtree(self.path)
            except OSError:
                pass

    def _write_marker(self) -> None:
        marker = self.path / MARKER_FILE
        if folder_kind(self.path) is not None:
            # Ours already, or written into with --overwrite as another kind of folder (an
            # evaluation inside a run folder, say): the folder keeps the kind it had.
            return
        content = {
            "kind": self.kind.key,
            "written_by": f"mri-vqvae {__version__}",
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "outputs": {},
        }
        try:
            write_text_atomic(marker, json.dumps(content, indent=2) + "\n")
        except OSError as err:
            raise OutputError(
                f"{self.describe()}: cannot write to the folder ({err.strerror or err})"
            ) from err

    def _record_outputs(self) -> None:
        """Add to the marker's manifest each output this command wrote (an entry named like
        the kind's outputs that is new or was replaced since it began), keeping the earlier
        entries nobody has touched. Only what the manifest names is ever deleted, so files a
        user keeps here stay the user's through any number of ``--overwrite`` runs."""
        self._recorded_at = time.monotonic()
        marker = _read_marker(self.path)
        if not marker:
            return
        owned = written_outputs(self.path)
        for name, identity in _output_files(self.path, self.kind.outputs).items():
            if self._before.get(name) != identity:
                owned[name] = identity
        marker["outputs"] = {name: list(identity) for name, identity in sorted(owned.items())}
        with contextlib.suppress(OSError):  # a folder gone read-only: the outputs stand
            write_text_atomic(self.path / MARKER_FILE, json.dumps(marker) + "\n")

    def remove_previous_outputs(self) -> list[str]:
        """With ``overwrite``: delete the files earlier commands wrote here, as the marker's
        manifest names them, and the folders they leave empty; an output folder that is a
        tool's folder of its own (a sample folder's ``evaluation/``) loses what its manifest
        names too. Returns the top-level names removed. A file a user put here, or replaced
        or edited since, is never deleted, only replaced by an output of the same name."""
        if not self.overwrite:
            return []
        removed = set()
        for name in sorted(written_outputs(self.path)):
            top = Path(name).parts[0]
            if _matches(top, self.kind.outputs):
                (self.path / name).unlink(missing_ok=True)
                removed.add(top)
        for entry in _user_entries(self.path):
            if not _matches(entry.name, self.kind.outputs) or entry.is_symlink():
                continue
            if entry.is_dir() and folder_kind(entry) is not None and _remove_owned(entry):
                removed.add(entry.name)
            if entry.is_dir():
                _prune_empty_folders(entry)
        self._warn_kept()
        if removed:
            logger.warning(
                "--overwrite: removed the previous %s's %s from %s",
                *(self.kind.title, ", ".join(sorted(removed)), self.path),
            )
        return sorted(removed)

    def _warn_kept(self) -> None:
        kept = sorted(_output_files(self.path, self.kind.outputs))
        if kept:
            logger.warning(
                "--overwrite: kept %d file(s) named like outputs that mri-vqvae did not write "
                "or that were changed since (%s%s); an output of the same name replaces one",
                *(len(kept), ", ".join(kept[:3]), " ..." if len(kept) > 3 else ""),
            )


def _remove_owned(folder: Path) -> bool:
    """Delete what ``folder``'s own manifest names (under its lock), and its marker once
    nothing else is left in it; whether anything was deleted."""
    with FolderLock(folder):
        owned = written_outputs(folder)
        for name in owned:
            (folder / name).unlink(missing_ok=True)
        for entry in _user_entries(folder):
            if entry.is_dir() and not entry.is_symlink():
                _prune_empty_folders(entry)
        if not _user_entries(folder):
            (folder / MARKER_FILE).unlink(missing_ok=True)
    return bool(owned)


def check_output_file(
    path: str | Path,
    option: str,
    overwrite: bool = False,
    inputs: tuple[Path, ...] = (),
    suffixes: tuple[str, ...] = (),
) -> Path:
    """Refuse an output file that is a folder, has the wrong suffix, is one of ``inputs``
    (always, whatever ``overwrite``), or exists without ``overwrite``; returns the path."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path}: is a folder; {option} names the file to write")
    if suffixes and not path.name.lower().endswith(suffixes):
        raise OutputError(f"{option} {path}: the name must end in {' or '.join(suffixes)}")
    for source in inputs:
        if _same_file(path, Path(source)):
            raise OutputError(
                f"{option} {path}: is the input {source}; an input is never written over, "
                "choose another output name"
            )
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputError(
            f"{option} {path}: already exists; pass --overwrite to replace it or choose "
            "another name"
        )
    folder = next((p for p in path.absolute().parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise OutputError(f"{option} {path}: {folder} is a file, not a folder")
    if folder is not None and not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: {folder} cannot be written (read-only?)")
    return path


def _same_file(first: Path, second: Path) -> bool:
    """The same file by path (after resolving links) or by inode (hard links)."""
    try:
        if os.path.realpath(first) == os.path.realpath(second):
            return True
        return first.exists() and second.exists() and os.path.samefile(first, second)
    except OSError:
        return False


# The output folders this process writes now (absolute, links not resolved): below them an
# output is never written through a symbolic link.
_OUTPUT_ROOTS: list[str] = []
# The same folders' OutputFolder, to record their manifest while they are written.
_ACTIVE: dict[str, OutputFolder] = {}
# How often, at most, a command's manifest is brought up to date while it writes: a command
# killed outright (SIGKILL, out of memory) leaves a manifest at most this old.
_RECORD_EVERY_SECONDS = 30.0


def _active_folder(path: Path) -> OutputFolder | None:
    target = os.path.abspath(path)
    for root in sorted(_ACTIVE, key=len, reverse=True):
        if target.startswith(root + os.sep):
            return _ACTIVE[root]
    return None


def refuse_links_into(path: Path) -> None:
    """Raise :class:`OutputError` if a folder between the output folder holding ``path`` and
    ``path`` itself is a symbolic link: a link named like an output folder (``reconstructions``,
    say) would carry the outputs, and the replacement of same-named files, outside it. The
    output folder itself may be a link the user made; ``path`` itself, if a link, is replaced
    by the new file, never written through."""
    target = os.path.abspath(path)
    for root in sorted(_OUTPUT_ROOTS, key=len, reverse=True):
        if not target.startswith(root + os.sep):
            continue
        folder = root
        for part in Path(target[len(root) + 1 :]).parts[:-1]:
            folder = os.path.join(folder, part)
            if os.path.islink(folder):
                raise OutputError(
                    f"{folder}: is a symbolic link where mri-vqvae writes an output folder; "
                    "outputs are never written through links (remove it, or choose another "
                    "output folder)"
                )
        return


def make_output_folder(folder: Path) -> Path:
    """Create ``folder`` (and the folders above it) to write outputs into, after
    :func:`refuse_links_into`: ``mkdir`` would otherwise make folders through a link."""
    folder = Path(folder)
    refuse_links_into(folder / "_")  # the check covers the folders above a file's name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def replaced_atomically(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write; when the block ends without an error it is
    renamed over ``path``, so a reader or a crash never meets half a file and an existing file
    is replaced only by a whole new one, and a link named like the output is replaced, not
    written through. The temporary file is created here, exclusively (a link or file already
    at its name is refused, never followed), so the writer opens a file of its own. ``suffix``
    ends the temporary name (nibabel chooses compression by it)."""
    refuse_links_into(path)
    folder = _active_folder(path)
    partial = path.with_name(f".{path.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    os.close(os.open(partial, flags, 0o666))
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    if folder is not None:
        folder.record_now_and_then()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all, flushed to disk before the rename."""
    with replaced_atomically(path) as partial, open(partial, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def write_csv_atomic(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV table (``header``, then ``rows``) to ``path`` whole or not at all."""
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, table.getvalue())


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """``torch.save`` ``payload`` (plain values and tensors) to ``path`` whole or not at all,
    flushed to disk before the rename: checkpoints, code maps and caches all go through it."""
    with replaced_atomically(path) as partial, open(partial, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())


def read_stamped(path: Path, stamp: dict[str, Any]) -> dict[str, Any] | None:
    """A cache written by :func:`write_stamped`, when it exists and carries exactly ``stamp``
    (what it was made from: format, inputs' hashes, settings); None otherwise. A damaged cache
    is reported and ignored, never trusted."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file fails in many ways deep inside torch.load
        logger.warning("ignoring unreadable cache %s (%s)", path, err)
        return None
    if not isinstance(stored, dict) or stored.get("stamp") != stamp:
        logger.info("%s was made from other inputs or settings; making it again", path)
        return None
    return stored["payload"]


def write_stamped(path: Path, stamp: dict[str, Any], payload: dict[str, Any]) -> None:
    """Cache ``payload`` at ``path`` with the ``stamp`` :func:`read_stamped` checks. A cache
    that cannot be written only costs time next run, so a failure is a warning."""
    try:
        make_output_folder(path.parent)
        save_atomic({"stamp": stamp, "payload": payload}, path)
    except OSError as err:
        logger.warning("could not write cache %s (%s)", path, err)


def _process_start(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (Linux), which tells a reused process
    id from the process that took a lock; None where /proc cannot say."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces; fields follow it.
    fields = text[text.rfind(")") + 2 :].split()
    if len(fields) < 20 or fields[0] == "Z":  # a zombie has ended; only its entry remains
        return "ended"
    return fields[19]


def _process_alive(owner: dict[str, Any]) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # a process on another machine cannot be checked: assume it runs
    pid = owner.get("pid")
    # Linux process ids stay below 2**22; anything else (a bool, a number beyond a C long)
    # names no process, as an edited or foreign lock may.
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 1 << 22:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass  # it exists, as another user's process
    started = _process_start(pid)
    if started == "ended":
        return False
    return started is None or owner.get("process_start") in (None, started)


# Locks this process holds, by path: taking one again (a command refreshing the report of the
# run it writes) nests instead of refusing itself.
_HELD: dict[Path, int] = {}


class FolderLock:
    """``FOLDER/.mri-vqvae.lock``: one process writes a folder at a time."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.token = uuid.uuid4().hex
        self._held = False

    def _owner(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_start": _process_start(os.getpid()),
            "command": " ".join(["mri-vqvae", *sys.argv[1:]])[:500],
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "token": self.token,
        }

    def _read(self, path: Path | None = None) -> dict[str, Any] | None:
        """The lock's owner; {} where there is no lock, None where it is unreadable."""
        path = path or self.path
        if not path.exists() and not path.is_symlink():
            return {}
        owner = _read_small_json(path)
        return owner if isinstance(owner, dict) else None

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; :class:`FolderBusy` if a live process
        holds it."""
        key = Path(os.path.realpath(self.path))
        if key in _HELD:
            _HELD[key] += 1
            self._held = True
            return
        for _ in range(5):
            try:
                descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as err:
                raise OutputError(
                    f"{self.folder}: cannot write its lock file ({err.strerror or err})"
                ) from err
            with os.fdopen(descriptor, "w") as handle:
                json.dump(self._owner(), handle)
                handle.flush()
                os.fsync(handle.fileno())
            _HELD[key] = 1
            self._held = True
            return
        raise FolderBusy(f"{self.folder}: could not take its lock {self.path}; try again")

    def _take_over_if_stale(self) -> None:
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return  # released meanwhile: try again
        if not stat.S_ISREG(mode):
            # A folder, link or FIFO by the lock's name is no lock of the tool's: never read,
            # moved or deleted here.
            raise OutputError(
                f"{self.path}: is not a lock file mri-vqvae wrote (a folder, link or other "
                f"special file has its name); remove it to write into {self.folder}"
            )
        owner = self._read()
        if owner == {}:
            return  # released meanwhile: try again
        if owner is None:  # empty or half-written: being created now, or left by a kill
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return
            if age < _EMPTY_LOCK_GRACE_SECONDS:
                raise FolderBusy(
                    f"{self.folder}: another process is taking its lock ({self.path}); try "
                    "again in a moment"
                )
        elif _process_alive(owner):
            raise FolderBusy(
                f"{self.folder}: in use by another mri-vqvae process (pid {owner.get('pid')} "
                f"on {owner.get('host')}, since {owner.get('since')}: {owner.get('command')}); "
                f"wait for it to end or choose another folder. If no such process runs, "
                f"delete {self.path}"
            )
        # Stale. Move it aside first, so of two processes breaking it only one succeeds, and
        # put it back if what was moved is not the lock that was judged stale.
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}-{self.token[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = self._read(aside)
        if moved != owner:
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        if owner is None:
            logger.warning("%s: took over an unreadable lock left by a killed process", self.folder)
            return
        logger.warning(
            "%s: took over a stale lock (pid %s on %s, since %s, no longer runs)",
            *(self.folder, shown(owner.get("pid")), owner.get("host"), owner.get("since")),
        )

    def release(self) -> None:
        """Give the lock up (only if this process holds it)."""
        if not self._held:
            return
        self._held = False
        key = Path(os.path.realpath(self.path))
        _HELD[key] = _HELD.get(key, 1) - 1
        if _HELD[key] > 0:
            return
        del _HELD[key]
        owner = self._read()
        if owner and owner.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
