"""One validation per setting, whatever path a value comes by: every numeric setting of the
config tree, found by walking its dataclasses, is given hostile values through a
``section.key=value`` override, a YAML file, the plain values a checkpoint holds and the
section's own constructor, and through its command-line flag where it has one. Each value
either loads or is refused with a ConfigError naming the setting; nothing else escapes."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import pytest

from mri_vqvae.cli.main import _SAMPLE_FLAGS, _SAMPLE_METRIC_FLAGS, _loop_flags
from mri_vqvae.cli.options import parse_args
from mri_vqvae.config import (
    MAX_ESTIMATED_BYTES,
    Config,
    ConfigError,
    Span,
    Whole,
    check_memory,
    config_from_dict,
    load_config,
    memory_estimates,
    physical_memory_bytes,
)

# As YAML text: beyond 64 bits, beyond float's range, at 2**63 and 2**64, finite yet
# overflowing float32 (1e39) or underflowing it (1e-45, the smallest double), negative,
# zero, the infinities and NaN, and a fraction for the integer settings.
HOSTILE = [
    str(2**70),
    "1" + "0" * 400,
    str(2**64),
    str(2**63),
    "1.0e+39",
    "-1.0e+39",
    "1.0e+308",
    "1.0e-45",
    "5.0e-324",
    "-1",
    "0",
    ".inf",
    "-.inf",
    ".nan",
    "0.5",
]


def _numeric(annotation: typing.Any) -> typing.Any:
    """The number type a setting holds (int or float, alone, optional or in a tuple), or
    None for the others."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [_numeric(arg) for arg in typing.get_args(annotation) if arg is not type(None)]
        return kinds[0] if len(kinds) == 1 else None
    if typing.get_origin(annotation) is tuple:
        return _numeric(typing.get_args(annotation)[0])
    return annotation if annotation in (int, float) else None


def numeric_settings() -> list[tuple[str, type, str, typing.Any]]:
    """(section, its class, setting, its annotation) for every numeric setting of the tree."""
    found = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        hints = typing.get_type_hints(cls)
        for setting in dataclasses.fields(cls):
            if _numeric(hints[setting.name]) is not None:
                found.append((section.name, cls, setting.name, hints[setting.name]))
    return found


SETTINGS = numeric_settings()
IDS = [f"{section}.{name}" for section, _, name, _ in SETTINGS]


def items(annotation: typing.Any) -> int:
    """How many numbers a setting holds: 0 for one alone, else the items of its tuple (one
    for a tuple of any length)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is not tuple:
        return 0
    args = typing.get_args(annotation)
    return 1 if args[-1] is Ellipsis else len(args)


def as_yaml(value: str, annotation: typing.Any) -> str:
    """``value`` shaped as the setting holds it: alone, or every item of its tuple."""
    count = items(annotation)
    return f"[{', '.join([value] * count)}]" if count else value


def as_python(value: typing.Any, annotation: typing.Any) -> typing.Any:
    """``value`` shaped as the setting holds it, as a checkpoint's plain values do."""
    count = items(annotation)
    return [value] * count if count else value


def limit_ends(cls: type, name: str) -> list[str]:
    """The accepted range's ends as YAML text: each must load or be refused by name too."""
    limit = cls.LIMITS[name]
    return [repr(limit.low), repr(limit.high)]


def loads_or_names(key: str, load) -> None:
    """``load()`` gives a Config (or section) whose setting ``key`` is within its limit, or
    a ConfigError that names ``key``; anything else fails."""
    try:
        loaded = load()
    except ConfigError as err:
        assert key in str(err), f"{key}: the refusal does not name it: {err}"
        return
    section, name = key.split(".")
    settings = getattr(loaded, section) if isinstance(loaded, Config) else loaded
    value = getattr(settings, name)
    for item in value if isinstance(value, tuple) else (value,):
        assert item is None or settings.LIMITS[name].problem(item) is None, (key, item)


def _hint(cls: type, name: str) -> typing.Any:
    return typing.get_type_hints(cls)[name]


def test_every_numeric_setting_has_exactly_one_limit():
    for section, cls, name, _ in SETTINGS:
        assert name in cls.LIMITS, f"{section}.{name} has no limit in {cls.__name__}.LIMITS"
        assert isinstance(cls.LIMITS[name], Whole if _numeric(_hint(cls, name)) is int else Span)
        assert section == cls.SECTION
    for cls in {cls for _, cls, _, _ in SETTINGS}:
        numeric = {name for _, owner, name, _ in SETTINGS if owner is cls}
        assert set(cls.LIMITS) == numeric, f"{cls.__name__}.LIMITS names no setting"


@pytest.mark.parametrize(("section", "cls", "name", "annotation"), SETTINGS, ids=IDS)
def test_hostile_values_load_or_are_named_on_every_path(
    section: str, cls: type, name: str, annotation: typing.Any, tmp_path: Path
):
    key = f"{section}.{name}"
    path = tmp_path / "settings.yaml"
    for value in [*HOSTILE, *limit_ends(cls, name)]:
        text = as_yaml(value, annotation)
        loads_or_names(key, lambda text=text: load_config(overrides=[f"{key}={text}"]))
        path.write_text(f"{section}:\n  {name}: {text}\n")
        loads_or_names(key, lambda: load_config(path))


@pytest.mark.parametrize(("section", "cls", "name", "annotation"), SETTINGS, ids=IDS)
def test_hostile_values_from_a_checkpoint_or_a_constructor_are_named(
    section: str, cls: type, name: str, annotation: typing.Any
):
    # A checkpoint holds plain Python values (config_from_dict); code builds sections by hand.
    key = f"{section}.{name}"
    values = [2**70, 10**400, 2**64, 1e39, -1e39, 1e-45, 5e-324, -1, 0, 0.5]
    for raw in [*values, float("inf"), float("-inf"), float("nan")]:
        value = as_python(raw, annotation)
        loads_or_names(key, lambda value=value: config_from_dict({section: {name: value}}))
        held = tuple(value) if isinstance(value, list) else value
        loads_or_names(key, lambda held=held: cls(**{name: held}))


# Flags that set a numeric setting, with the command line each needs around it.
FLAG_COMMANDS = {
    "train": (["train", "--data", "d", "--out", "o"], _loop_flags("train")),
    "sample": (["sample", "--vqvae", "v", "--prior", "p", "--out", "o"], _SAMPLE_FLAGS),
    "evaluate-samples": (["evaluate-samples", "--samples", "s"], _SAMPLE_METRIC_FLAGS),
}


def flag_settings() -> list[tuple[str, str, str]]:
    """(command, flag, the setting it sets) for every flag that sets a numeric setting."""
    found = []
    for command, (_, flags) in FLAG_COMMANDS.items():
        for flag, key in flags.items():
            section, name = key.split(".")
            limits = typing.get_type_hints(Config)[section].LIMITS
            # --checkpoint-every asks for 1 or more: leaving it out is the setting's 0.
            if name in limits and name != "checkpoint_every":
                found.append((command, f"--{flag.replace('_', '-')}", key))
    return found


FLAGS = flag_settings()


@pytest.mark.parametrize(("command", "flag", "key"), FLAGS, ids=[f[1] for f in FLAGS])
def test_a_flag_accepts_what_its_setting_accepts(command: str, flag: str, key: str, capsys):
    required = FLAG_COMMANDS[command][0]
    for value in ["1", "2", "1000", "0.001", *HOSTILE[:10], "nan", "inf", "-inf", "1e400"]:
        try:
            parse_args([*required, flag, value])
            flag_ok = True
        except SystemExit:
            flag_ok = False
            assert f"argument {flag}" in capsys.readouterr().err
        try:
            load_config(overrides=[f"{key}={value}"])
            config_ok, refusal = True, ""
        except ConfigError as err:
            config_ok, refusal = False, str(err)
        if config_ok:
            assert flag_ok, f"{flag} {value} refused, yet {key}={value} loads"
        elif flag_ok:  # only the tree's other settings may refuse it (its memory, say)
            assert not refusal.startswith(f"{key} "), f"{flag} {value} taken: {refusal}"


def test_the_examples_of_the_issue_are_refused_by_name():
    examples = {
        "sample.seed=99999999999999999999999": "sample.seed must be at most 4294967295",
        "data.image_size=[65536,65536]": "data.image_size must hold at most 67108864 pixels",
        "model.channels=100000": "model.channels must be at most 4096",
        "model.in_channels=3": "model.in_channels must be 1 (the slices are read as grey",
        "sample.guidance=1e39": r"sample.guidance must be a finite number in [0, 100]",
        "sample.temperature=1e-45": "sample.temperature must be a finite number > 0, in [0.001",
    }
    for override, message in examples.items():
        with pytest.raises(ConfigError) as caught:
            load_config(overrides=[override])
        assert message in str(caught.value)


def test_memory_is_estimated_before_anything_is_allocated():
    assert all(e.total_bytes < 2**31 for e in memory_estimates(Config()))
    check_memory(Config())  # the defaults fit the fixed cap, and a few GiB
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=["data.image_size=[8192, 8192]"])
    message = str(caught.value)
    assert message.startswith("training the VQ-VAE would need about ")
    assert "GiB" in message and "data.image_size" in message and "train.batch_size" in message
    with pytest.raises(ConfigError, match="training the prior would need about"):
        load_config(overrides=["prior.width=4096", "prior.num_heads=4", "prior.num_layers=64"])
    with pytest.raises(ConfigError, match=r"sampling would need .* sample\.num_samples"):
        load_config(overrides=["data.image_size=[2048, 2048]", "sample.num_samples=100000"])
    # A command compares with its machine: the same check, with a smaller limit.
    with pytest.raises(ConfigError, match=r"more than the 1\.0 MiB allowed"):
        check_memory(Config(), limit=2**20)
    # Native sizes are known only from the data: the parameters alone, then the slices'.
    native = load_config(overrides=["data.image_size=null"])
    assert all(e.activation_bytes == 0 for e in memory_estimates(native))
    sized = memory_estimates(native, image_size=(256, 128))
    assert [e.total_bytes for e in sized] == [e.total_bytes for e in memory_estimates(Config())]
    assert MAX_ESTIMATED_BYTES == 256 * 2**30
    ram = physical_memory_bytes()
    assert ram is None or ram > 2**20
