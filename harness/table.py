"""What a run setting is, the kinds of value one holds, and a Table of settings, from which the harness
derives everything it does with them: the defaults, the command line's setting flags and their checks,
the check of every run's resolved settings, which settings name a run's folder and are compared on
resume, the keyword arguments of a component (SES), and display labels.

    Setting(name, default, kind, help, check=None, flag=False, identity=True, label="", to=<reader>, arg="")

name      the key in a run's config and in its config.json
default   the value when neither the script's setup, the grid, --smoke nor the command line sets one
kind      what a value must be (Kind: integer(), number(), choice(), integers(), ...): checks grid and
          flag values alike and turns a flag's text into a value (a list's flag takes one or more)
help      what it does; a flag's help adds the default of each config ("(default 1 (ses_k1) / 3 ...)")
check     the owner's own check, raising ValueError that names what is wrong (ses_core.check_beta)
flag      a command-line flag: True spells it --name-with-dashes, a string gives another spelling
identity  part of the run's identity: an override names the run's folder (<config>+<name>=<value>)
          and a resumed run must have the stored value; False for what only changes how a result is
          computed, not the result (chunk sizes): changing it resumes the same run
label     a short display name for tables and figures ("λ"); the name when empty
to        the component that reads it, one of READERS ("SES": passed to ses_core.SES(...) by keyword; the
          others say where it is read: "data", "model", "hooks", "training", "evaluation", "callback" (a
          script's epoch callback), "report", "run"); a name outside READERS is refused when the table loads
arg       that keyword, when it is not the name

The harness's table is harness/settings.py; a script adds entries of its own (exp13_perceiver.py), which
join the defaults layer of its runs and its command line the same way.
"""
from __future__ import annotations

import argparse
import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Kind", "Setting", "Table", "integer", "number", "optional", "choice", "integers", "numbers",
           "BOOLEAN", "TEXT", "READERS", "flag_type"]


@dataclass(frozen=True)
class Kind:
    """What a setting's value must be, and how a flag's text becomes one."""
    what: str                                    # "an integer >= 1": errors say "<name> must be <what>, got <value>"
    accepts: Callable[[Any], bool]               # whether a value (from a grid, a setup or a flag) is one
    parse: Callable[[str], Any] | None = None    # a flag's text -> value; None: --name / --no-name (true/false)
    choices: tuple | Callable | None = None      # the allowed values, or registry -> them
    item: "Kind | None" = None                   # a list's items (a flag then takes one or more values)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(low: int | None = None) -> Kind:
    """An integer (>= low)."""
    return Kind("an integer" + (f" >= {low}" if low is not None else ""),
                lambda v: _is_int(v) and (low is None or v >= low), int)


def number(low: float | None = None, above: float | None = None, below: float | None = None) -> Kind:
    """A finite number, >= low, > above, < below (each when given)."""
    bounds = [f"{op} {b:g}" for op, b in ((">=", low), (">", above), ("<", below)) if b is not None]
    return Kind("a finite number" + (" " + " and ".join(bounds) if bounds else ""),
                lambda v: _is_number(v) and (low is None or v >= low) and (above is None or v > above)
                and (below is None or v < below), float)


def optional(kind: Kind) -> Kind:
    """None (off; a flag's text "none") or a value of `kind`."""
    return Kind(f"{kind.what} or none", lambda v: v is None or kind.accepts(v), kind.parse, kind.choices, kind.item)


def choice(names: tuple | Callable) -> Kind:
    """One of `names` (a tuple, or registry -> names: the code that owns them decides)."""
    return Kind("one of the names", lambda v: isinstance(v, str), str, names)


def integers(low: int | None = None) -> Kind:
    """A list of integers (>= low); as a flag, one or more values (--name 25 40 52)."""
    item = integer(low)
    return Kind("a list of integers" + item.what[len("an integer"):],
                lambda v: isinstance(v, list) and all(item.accepts(x) for x in v), item=item)


def numbers(low: float | None = None) -> Kind:
    """A list of finite numbers (>= low); as a flag, one or more values (--name 0.05 0.1)."""
    item = number(low)
    return Kind("a list of finite numbers" + item.what[len("a finite number"):],
                lambda v: isinstance(v, list) and all(item.accepts(x) for x in v), item=item)


BOOLEAN = Kind("true or false", lambda v: isinstance(v, bool))
TEXT = Kind("a non-empty text", lambda v: isinstance(v, str) and v != "", str)
READERS = ("SES", "data", "model", "hooks", "training", "evaluation", "callback", "report", "run")  # what `to` names


@dataclass(frozen=True)
class Setting:
    """One run setting; its fields are the table's columns (the module's docstring says what each means)."""
    name: str
    default: Any
    kind: Kind
    help: str
    check: Callable[[Any], Any] | None = None
    flag: bool | str = False
    identity: bool = True
    label: str = ""
    to: str = ""
    arg: str = ""

    def __post_init__(self):
        """A typo in `to` would parse a setting and never pass it on; a flag needs a kind it can parse."""
        if self.to not in READERS:  # to has no usable default: every setting names its reader
            raise ValueError(f"setting {self.name!r}: to={self.to!r} names no reader; give to= one of "
                             f"{', '.join(READERS)}")
        if self.flag and self.kind.parse is None and self.kind.item is None and self.kind is not BOOLEAN:
            raise ValueError(f"setting {self.name!r}: a flag of {self.kind.what} cannot be parsed from the command "
                             f"line; give its Kind a parse")

    @property
    def option(self) -> str:
        """The flag's spelling ('' when it is none)."""
        if not self.flag:
            return ""
        return self.flag if isinstance(self.flag, str) else "--" + self.name.replace("_", "-")

    def choices(self, registry=None) -> tuple | None:
        names = self.kind.choices
        return tuple(names(registry)) if callable(names) else names

    def problem(self, value, registry=None) -> str:
        """What is wrong with `value` for this setting, in one line; '' if nothing. Choices that come
        from the registry are checked when it is given."""
        if value is None and self.kind.accepts(None):  # an optional setting, off
            return ""
        if self.kind.choices is not None:
            names = self.choices(registry) if registry is not None or not callable(self.kind.choices) else None
            if names is not None and value not in names:
                return f"{self.name} must be one of {', '.join(map(str, names))}, got {value!r}"
        elif not self.kind.accepts(value):
            return f"{self.name} must be {self.kind.what}, got {value!r}"
        if self.check is not None:
            try:
                self.check(value)
            except (ValueError, TypeError) as e:
                return str(e)
        return ""


class Table(Mapping):
    """Settings by name, in the order given; each name once."""

    def __init__(self, settings: Iterable[Setting]):
        self._settings: dict[str, Setting] = {}
        for s in settings:
            if s.name in self._settings:
                raise ValueError(f"setting {s.name!r} is declared twice")
            self._settings[s.name] = s

    def __getitem__(self, name: str) -> Setting:
        return self._settings[name]

    def __iter__(self):
        return iter(self._settings)

    def __len__(self) -> int:
        return len(self._settings)

    def extended(self, settings: Iterable[Setting] = ()) -> "Table":
        """This table plus a script's own entries (an entry of a name already here replaces it)."""
        merged = dict(self._settings)
        merged.update({s.name: s for s in settings})
        return Table(merged.values())

    def defaults(self) -> dict:
        return {name: s.default for name, s in self._settings.items()}

    def flags(self) -> list[Setting]:
        return [s for s in self._settings.values() if s.flag]

    def identity(self, name: str) -> bool:
        """Whether a config key is part of a run's identity (keys that are no setting are: the run's facts)."""
        return self._settings[name].identity if name in self._settings else True

    def arguments(self, to: str, cfg: Mapping) -> dict:
        """The keyword arguments of component `to` from a run's settings: {arg or name: value}."""
        return {s.arg or s.name: cfg[s.name] for s in self._settings.values() if s.to == to}

    def label(self, name: str) -> str:
        s = self._settings.get(name)
        return (s.label or s.name) if s is not None else name

    def problems(self, cfg: Mapping, registry=None, facts: Iterable[str] = ()) -> list[str]:
        """One line per key of a resolved config that is no setting (nor one of the run's `facts`), and
        per value its setting refuses."""
        facts = set(facts)
        lines = []
        for key, value in cfg.items():
            if key in self._settings:
                why = self._settings[key].problem(value, registry)
            elif key in facts:
                why = ""
            else:
                near = difflib.get_close_matches(key, list(self._settings), n=1)
                why = f"unknown setting {key!r}" + (f" (did you mean {near[0]}?)" if near else "")
            if why:
                lines.append(why)
        return lines

    def add_flags(self, parser: argparse.ArgumentParser, registry=None,
                  shown: Callable[[str], Any] | None = None) -> None:
        """One flag per flag setting, dest = its name, absent from the parsed namespace unless given (a
        config keeps its own value; a given value may be None: --clip-grad none); the help ends with the
        default `shown(name)` gives (each config's, by default the table's)."""
        for s in self.flags():
            default = shown(s.name) if shown is not None else s.default
            text = f"{s.help} (default {default})".replace("%", "%%")
            names = s.choices(registry)
            common = dict(dest=s.name, default=argparse.SUPPRESS, help=text)
            if s.kind.item is not None:  # a list: one or more values, each checked as the list's item
                parser.add_argument(s.option, nargs="+", metavar="V", type=flag_type(s.kind.item, s.name), **common)
            elif s.kind.parse is None:
                parser.add_argument(s.option, action=argparse.BooleanOptionalAction, **common)
            elif names is not None:
                parser.add_argument(s.option, choices=names, **common)
            else:
                parser.add_argument(s.option, type=flag_type(s.kind, s.name, s.problem), **common)


def flag_type(kind: Kind, name: str, problem: Callable[[Any], str] | None = None):
    """argparse `type` for a flag of `kind`: its text parsed, then checked (problem(value): what is wrong,
    '' if nothing; default: the kind's own test); an optional kind takes "none"."""
    def parse(text: str):
        if text.strip().lower() == "none" and kind.accepts(None):  # an optional setting turned off
            return None
        try:
            value = kind.parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.parse.__name__}") from None
        why = problem(value) if problem is not None else ("" if kind.accepts(value) else
                                                          f"{name} must be {kind.what}, got {value!r}")
        if why:
            raise argparse.ArgumentTypeError(why)
        return value
    return parse
