"""Typed records: what one level hands another, and what the JSON files the tool writes hold.

A record is a frozen dataclass. Its fields' type hints are its schema: :func:`from_plain`
checks a value read from a file against them, field by field, and a value of the wrong type, a
missing field or a newer version is refused with a :class:`RecordError` that names the file and
the field, never a ``KeyError`` deep in the reader. Extra keys are ignored, so a file from a
newer release that only added figures still reads. The report and the command line read records
through attributes, never by string keys.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from mri_vqvae.errors import InputError, shown
from mri_vqvae.files import write_text_atomic

RecordType = TypeVar("RecordType", bound="Record")

# Where a JSON key differs from the field's name (a key that is no identifier, say):
# ``field(metadata=json_key("share_samples_above_0.95"))``.
JSON_KEY = "json_key"


def json_key(name: str) -> dict[str, str]:
    """A field's metadata naming its key in the JSON file."""
    return {JSON_KEY: name}


class RecordError(InputError):
    """A file or value is not the record it should be; the message names it and the field."""


def _key(field: dataclasses.Field) -> str:
    return field.metadata.get(JSON_KEY, field.name)


def to_plain(value: Any) -> Any:
    """A record (or any dataclass, tuple, list, dict or path inside one) as JSON-safe values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {_key(f): to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): to_plain(item) for key, item in value.items()}
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy and torch scalars
        return value.item()
    return value


def parse_json(text: str, source: str) -> Any:
    """``json.loads(text)``, or a :class:`RecordError` naming ``source`` for text that is no
    JSON or nests too deeply for the parser (a hostile file, not a record)."""
    try:
        return json.loads(text)
    except ValueError as err:
        raise RecordError(f"{source}: not valid JSON ({err})") from err
    except RecursionError as err:
        raise RecordError(f"{source}: not a record, its JSON nests too deeply to read") from err


class Where(typing.NamedTuple):
    """Where a value was read: the file (or other source) and the field inside it."""

    source: str
    field: str = ""

    def child(self, key: object) -> Where:
        """The place of ``key`` inside this one."""
        if isinstance(key, int):
            return Where(self.source, f"{self.field}[{key}]")
        return Where(self.source, f"{self.field}.{key}" if self.field else str(key))

    def __str__(self) -> str:
        return f"{self.source}: {self.field}" if self.field else self.source


def _fail(where: Where, expected: str, value: Any) -> typing.NoReturn:
    raise RecordError(f"{where}: expected {expected}, got {shown(value)}")


def _is_union(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType)


def from_plain(kind: Any, value: Any, where: Where) -> Any:
    """``value`` (as ``json.loads`` gives it) converted to the type ``kind`` and checked on the
    way; ``where`` names the file and field for messages."""
    if kind is Any:
        return value
    if kind is type(None) or kind is None:
        if value is not None:
            _fail(where, "null", value)
        return None
    if _is_union(kind):
        return _from_union(typing.get_args(kind), value, where)
    origin = typing.get_origin(kind)
    if origin is not None:
        return _from_generic(origin, typing.get_args(kind), value, where)
    if dataclasses.is_dataclass(kind):
        return _from_dataclass(kind, value, where)
    return _from_scalar(kind, value, where)


def _from_union(arms: tuple[Any, ...], value: Any, where: Where) -> Any:
    if value is None and type(None) in arms:
        return None
    errors = []
    for arm in (arm for arm in arms if arm is not type(None)):
        try:
            return from_plain(arm, value, where)
        except RecordError as err:
            errors.append(err)
    if len(errors) == 1:
        raise errors[0]
    names = " or ".join(getattr(arm, "__name__", str(arm)) for arm in arms)
    _fail(where, names, value)


def _from_generic(origin: Any, arguments: tuple[Any, ...], value: Any, where: Where) -> Any:
    if origin in (list, tuple):
        if not isinstance(value, list):
            _fail(where, "a list", value)
        if origin is list:
            return [from_plain(arguments[0], item, where.child(i)) for i, item in enumerate(value)]
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return tuple(
                from_plain(arguments[0], item, where.child(i)) for i, item in enumerate(value)
            )
        if len(value) != len(arguments):
            _fail(where, f"a list of {len(arguments)} items", value)
        return tuple(
            from_plain(kind, item, where.child(i))
            for i, (kind, item) in enumerate(zip(arguments, value, strict=True))
        )
    if origin is dict:
        if not isinstance(value, dict):
            _fail(where, "an object", value)
        key_type, item_type = arguments
        return {
            from_plain(key_type, key, where): from_plain(item_type, item, where.child(key))
            for key, item in value.items()
        }
    if origin is typing.Literal:
        if value not in arguments:
            _fail(where, " or ".join(repr(a) for a in arguments), value)
        return value
    raise TypeError(f"{where}: records cannot hold {origin}")  # the schema's mistake


def _from_scalar(kind: Any, value: Any, where: Where) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            _fail(where, "true or false", value)
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(where, "a whole number", value)
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(where, "a number", value)
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            _fail(where, "text", value)
        return value
    raise TypeError(f"{where}: records cannot hold {kind}")  # the schema's mistake


def _from_dataclass(kind: type, value: Any, where: Where) -> Any:
    if not isinstance(value, dict):
        _fail(where, "an object", value)
    hints = typing.get_type_hints(kind)
    given = {}
    for field in dataclasses.fields(kind):
        if not field.init:
            continue
        key = _key(field)
        if key not in value:
            if (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            ):
                raise RecordError(f"{where.child(key)}: missing")
            continue
        given[field.name] = from_plain(hints[field.name], value[key], where.child(key))
    try:
        return kind(**given)
    except (ValueError, TypeError) as err:  # the dataclass's own checks (a ConfigError, say)
        raise RecordError(f"{where}: {err}") from err


@dataclasses.dataclass(frozen=True)
class Record:
    """The base of the records written to files: ``to_json``/``from_json`` with a version.

    ``VERSION`` counts changes of meaning; a file of a higher version than this release's is
    refused by name. Files written before records carried a version read as version 0, as long
    as their fields check out."""

    VERSION: ClassVar[int] = 1
    # What the file is, for messages ("an evaluation's metrics.json").
    DESCRIPTION: ClassVar[str] = "record"

    def to_plain(self) -> dict[str, Any]:
        """The record as JSON-safe values, with its version first."""
        return {"version": self.VERSION, **to_plain(self)}

    def to_json(self) -> str:
        """The record as indented JSON (NaN for a figure that could not be computed)."""
        return json.dumps(self.to_plain(), indent=2) + "\n"

    def write(self, path: str | Path) -> Path:
        """Write the record to ``path`` whole or not at all (a temporary file, then rename)."""
        write_text_atomic(Path(path), self.to_json())
        return Path(path)

    @classmethod
    def from_plain(cls: type[RecordType], value: Any, source: str = "record") -> RecordType:
        """The record in ``value``, checked; ``source`` names it in messages."""
        where = Where(source)
        if not isinstance(value, dict):
            _fail(where, f"{cls.DESCRIPTION} (a JSON object)", value)
        version = value.get("version", 0)
        if isinstance(version, bool) or not isinstance(version, int):
            _fail(where.child("version"), "a whole number", version)
        if version > cls.VERSION:
            raise RecordError(
                f"{source}: {cls.DESCRIPTION} of version {version}, written by a newer "
                f"mri-vqvae; this one reads up to version {cls.VERSION}"
            )
        return from_plain(cls, value, where)

    @classmethod
    def from_json(cls: type[RecordType], text: str, source: str = "record") -> RecordType:
        """The record in the JSON ``text``, checked."""
        return cls.from_plain(parse_json(text, source), source)

    @classmethod
    def read(cls: type[RecordType], path: str | Path) -> RecordType:
        """The record in the file ``path``, checked; a missing, unreadable or foreign file is
        a :class:`RecordError` naming it."""
        path = Path(path)
        if path.exists() and not path.is_file():  # reading a FIFO would wait forever
            raise RecordError(f"{path}: not a regular file, so not {cls.DESCRIPTION}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise RecordError(f"{path}: not UTF-8 text, so not {cls.DESCRIPTION}") from err
        except OSError as err:
            raise RecordError(f"{path}: cannot read it ({err.strerror or err})") from err
        return cls.from_json(text, str(path))
