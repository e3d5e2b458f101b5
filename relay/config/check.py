"""Checking parsed YAML against the frozen records of relay/config/records.py.

Each record field carries a *check* (``spec(check, default)``): a function of the raw value that
returns the typed value or raises ValueError with a message for the admin. A record may also
define ``_prepare(data)`` (defaults that depend on other keys, applied to the raw mapping before
the fields are checked) and ``_check(self)`` (rules across fields, run only once every field is
valid). Every problem is recorded with its key path, so one pass reports them all.

Type errors keep the wording pydantic gave them when the config was checked with it ("Input
should be a valid integer"), so messages, docs and tests stay the same. This replaces pydantic,
which cost the relay ~10 MB of RSS and ~250 ms of start-up for a dozen records (issue 6).
"""

# Every check raises ValueError, also for a wrong type: it is reported by key path, not raised.
# ruff: noqa: TRY004

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from typing import Any, Self, TypeVar, dataclass_transform

Check = Callable[[Any, "Run"], Any]
R = TypeVar("R")


class Failed(Exception):
    """Raised by a check whose problems are already recorded (a nested record or list)."""


class ValidationError(ValueError):
    """``Record.model_validate`` failed; ``problems`` lists every one by key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class Run:
    """One validation: its context (``base_dir``, ``apps``) and the problems found so far."""

    __slots__ = ("context", "path", "problems")

    def __init__(self, context: Mapping[str, Any] | None, path: str = "",
                 problems: list[str] | None = None) -> None:
        self.context: Mapping[str, Any] = context or {}
        self.path = path
        self.problems: list[str] = [] if problems is None else problems

    def at(self, key: object) -> Run:
        """The same run, one key deeper (``[2]`` for list items)."""
        if isinstance(key, int):
            path = f"{self.path}[{key}]"
        else:
            path = f"{self.path}.{key}" if self.path else str(key)
        return Run(self.context, path, self.problems)

    def report(self, message: str) -> None:
        self.problems.append(f"{self.path or '(top level)'}: {message}")


# --- records -------------------------------------------------------------------------------


def spec(check: Check, *, default: Any = dataclasses.MISSING, key: str | None = None) -> Any:
    """A record field: its check, its default (none: required) and its YAML key if not its
    name (``from``, a Python keyword)."""
    return dataclasses.field(default=default, metadata={"check": check, "key": key})


def _refuse(self: object, name: str, value: object = None) -> None:
    raise dataclasses.FrozenInstanceError(
        f"{type(self).__name__} is frozen: cannot change {name!r} (reload the config instead)")


@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(spec,))
def record(cls: type[R]) -> type[R]:
    """``@dataclass(frozen=True, slots=True, kw_only=True)``, saying "frozen" when assigned to."""
    out = dataclasses.dataclass(frozen=True, slots=True, kw_only=True)(cls)
    out.__setattr__ = _refuse  # type: ignore[method-assign]
    out.__delattr__ = _refuse  # type: ignore[method-assign]
    return out


class Record:
    """Base of the config records: validation from raw data, as pydantic models offered it."""

    __slots__ = ()

    @classmethod
    def model_validate(cls, data: Any, *, context: Mapping[str, Any] | None = None) -> Self:
        run = Run(context)
        try:
            return validate(cls, data, run)
        except Failed:
            raise ValidationError(run.problems) from None


def validate(cls: type[R], data: Any, run: Run) -> R:
    """``data`` (a mapping) as a ``cls`` record; problems go to ``run``, then Failed is raised."""
    if isinstance(data, cls):
        return data
    try:
        prepare = getattr(cls, "_prepare", None)
        data = prepare(data) if prepare is not None else data
        if not isinstance(data, Mapping):
            raise ValueError("expected a mapping of keys")  # noqa: TRY301
    except ValueError as exc:
        run.report(str(exc))
        raise Failed from None
    values: dict[str, Any] = {}
    failed = False
    keys: list[str] = []
    used: set[str] = set()  # the YAML key, or else the attribute name (``from_``)
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = field.metadata["key"] or field.name
        keys.append(key)
        given = key if key in data else field.name
        if given not in data:
            if field.default is dataclasses.MISSING:
                run.at(key).report("required key is missing")
                failed = True
            continue
        used.add(given)
        try:
            values[field.name] = field.metadata["check"](data[given], run.at(given))
        except ValueError as exc:
            run.at(given).report(str(exc))
            failed = True
        except Failed:
            failed = True
    for key in data:
        if key not in used:
            guess = difflib.get_close_matches(str(key), keys, n=1)
            run.at(key).report("unknown key" + (f" (did you mean `{guess[0]}`?)" if guess else ""))
            failed = True
    if failed:
        raise Failed
    made = cls(**values)
    try:
        if (check := getattr(made, "_check", None)) is not None:
            check()
    except ValueError as exc:
        run.report(str(exc))
        raise Failed from None
    return made


def nested(cls: type[R]) -> Check:
    return lambda value, run: validate(cls, value, run)


def items(check: Check, *, min_length: int = 0) -> Check:
    """A list checked item by item, as a tuple (records stay immutable)."""
    def run_items(value: Any, run: Run) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple):
            raise ValueError("Input should be a valid tuple")
        out, failed = [], False
        for i, item in enumerate(value):
            try:
                out.append(check(item, run.at(i)))
            except ValueError as exc:
                run.at(i).report(str(exc))
                failed = True
            except Failed:
                failed = True
        if failed:
            raise Failed
        _at_least(len(out), min_length, "Tuple")
        return tuple(out)
    return run_items


def mapping(check: Check, *, min_length: int = 0) -> Check:
    """A mapping of names (strings) to values checked one by one."""
    def run_mapping(value: Any, run: Run) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise ValueError("Input should be a valid dictionary")
        out, failed = {}, False
        for name, item in value.items():
            if not isinstance(name, str):
                run.at(name).at("[key]").report("Input should be a valid string")
                failed = True
            try:
                out[name] = check(item, run.at(name))
            except ValueError as exc:
                run.at(name).report(str(exc))
                failed = True
            except Failed:
                failed = True
        if failed:
            raise Failed
        _at_least(len(out), min_length, "Dictionary")
        return out
    return run_mapping


def _at_least(length: int, min_length: int, kind: str) -> None:
    if length < min_length:
        plural = "s" if min_length != 1 else ""
        raise ValueError(f"{kind} should have at least {min_length} item{plural} after "
                         f"validation, not {length}")


# --- plain values (pydantic's lax mode: YAML and environment strings are coerced) ----------

_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


def text(value: Any, run: Run) -> str:
    if not isinstance(value, str):
        raise ValueError("Input should be a valid string")
    return value


def boolean(value: Any, run: Run) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, int | str) or (isinstance(value, float) and value.is_integer()):
        raise ValueError("Input should be a valid boolean, unable to interpret input")
    raise ValueError("Input should be a valid boolean")


def integer(ge: int | None = None, le: int | None = None) -> Check:
    def check(value: Any, run: Run) -> int:
        if isinstance(value, int):
            number = int(value)
        elif isinstance(value, float):
            if not value.is_integer():
                raise ValueError("Input should be a valid integer, got a number with a "
                                 "fractional part")
            number = int(value)
        elif isinstance(value, str):
            try:
                number = int(value.strip())
            except ValueError:
                raise ValueError("Input should be a valid integer, unable to parse string as "
                                 "an integer") from None
        else:
            raise ValueError("Input should be a valid integer")
        return _bounded(number, ge, le)
    return check


def number(ge: float | None = None) -> Check:
    def check(value: Any, run: Run) -> float:
        if isinstance(value, int | float):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                raise ValueError("Input should be a valid number, unable to parse string as a "
                                 "number") from None
        else:
            raise ValueError("Input should be a valid number")
        if ge is not None and not out >= ge:
            raise ValueError(f"Input should be greater than or equal to {ge}")
        return out
    return check


def _bounded(value: int, ge: int | None, le: int | None) -> int:
    if ge is not None and value < ge:
        raise ValueError(f"Input should be greater than or equal to {ge}")
    if le is not None and value > le:
        raise ValueError(f"Input should be less than or equal to {le}")
    return value


def choice(*options: str) -> Check:
    """One of ``options`` (a Literal of strings)."""
    quoted = [repr(o) for o in options]
    said = f"{', '.join(quoted[:-1])} or {quoted[-1]}" if len(quoted) > 1 else quoted[0]

    def check(value: Any, run: Run) -> str:
        if value not in options or not isinstance(value, str):
            raise ValueError(f"Input should be {said}")
        return value
    return check


def optional(check: Check) -> Check:
    """``check``, or None as it is (YAML ``key: null``, or ``key:`` with nothing after)."""
    return lambda value, run: None if value is None else check(value, run)


def plain(convert: Callable[[Any], R]) -> Check:
    """A check from a function of the value alone."""
    return lambda value, run: convert(value)


def then(*checks: Check) -> Check:
    """The checks one after the other, each on the value the previous returned."""
    def check(value: Any, run: Run) -> Any:
        for one in checks:
            value = one(value, run)
        return value
    return check
