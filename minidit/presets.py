"""Method presets: what the paper describes ("paper") or what the authors' released code computes ("official").

Each method has one small frozen settings dataclass (`personalize.PersonalizeSettings`,
`personalize.EditSettings`, `freecus.FreeCusSettings`) with two named constructors, `.paper()` and
`.official()`, so the difference between the presets is a readable diff of fields (README: "Presets").
An entry point takes `preset="paper" | "official"` (or a settings object) plus any field as a keyword, checked
against the dataclass's fields (`resolve`); a field left out (or given as `PRESET`) takes the preset's value, any
other value overrides exactly that field. `document_settings` lists every field with both presets' values in the
entry point's docstring, so `help(pipe.inpaint)` shows them:

    pipe.inpaint(image, mask, prompt, preset="official", tau=30)          # their code, but τ = 30 (their units)
    s = EditSettings.resolve("official", blend=True)                      # the same resolution, by hand
    pipe.inpaint(image, mask, prompt, preset=s); s.asdict()               # -> what the CLI writes to the PNG
"""
from __future__ import annotations

import dataclasses
import typing

PRESETS = ("paper", "official")


class _Preset:
    """The default of every preset field in an entry point's signature: "take the preset's value"."""
    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "PRESET"

    def __reduce__(self):
        return "PRESET"


PRESET = _Preset()


class Settings:
    """Mixin of the settings dataclasses: preset resolution, validation hook, plain-dict export, text parsing."""

    @classmethod
    def paper(cls):
        raise NotImplementedError

    @classmethod
    def official(cls):
        raise NotImplementedError

    @classmethod
    def resolve(cls, preset="paper", **overrides):
        """`preset` ("paper", "official" or an instance) with every override that is not PRESET applied."""
        if isinstance(preset, cls):
            base = preset
        elif isinstance(preset, str) and preset in PRESETS:
            base = getattr(cls, preset)()
        else:
            raise ValueError(f"preset must be one of {PRESETS} or a {cls.__name__}, got {preset!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"{cls.__name__} has no field(s) {unknown}; fields: {sorted(names)}")
        changes = {k: v for k, v in overrides.items() if v is not PRESET}
        return dataclasses.replace(base, **changes) if changes else base

    def asdict(self) -> dict:
        """The fields as a plain JSON-able dict (tuples become lists), e.g. for PNG metadata."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def diff(self, other) -> dict:
        """{field: (self's value, other's value)} for the fields that differ."""
        a, b = self.asdict(), other.asdict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    @classmethod
    def parse(cls, items: list[str] | None) -> dict:
        """Command-line overrides ["field=value", ...] -> {field: typed value}; booleans true/false/yes/no/1/0,
        "none" for an optional field, comma-separated integers for a tuple field."""
        out = {}
        hints = typing.get_type_hints(cls)
        for item in items or []:
            if "=" not in item:
                raise ValueError(f"--set takes FIELD=VALUE, got {item!r}")
            key, text = (s.strip() for s in item.split("=", 1))
            key = key.replace("-", "_")
            if key not in hints:
                raise ValueError(f"--set: {cls.__name__} has no field {key!r}; fields: "
                                 f"{', '.join(f.name for f in dataclasses.fields(cls))}")
            out[key] = _parse_value(key, text, hints[key])
        return out


def _parse_value(key: str, text: str, hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    if optional and text.lower() == "none":
        return None
    kind = args[0] if optional and len(args) == 1 else hint
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            low = text.lower()
            if low not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                raise ValueError
            return low in ("true", "yes", "1", "on")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if origin is tuple:
            return tuple(int(v) for v in text.split(",") if v.strip())
        return text
    except ValueError:
        raise ValueError(f"--set {key}={text!r}: expected {getattr(kind, '__name__', kind)}") from None


def document_settings(cls):
    """Decorator of an entry point taking `**settings` of the dataclass `cls`: appends every field with its "paper"
    and "official" value to the docstring (the one place these keyword lists are written is the dataclass)."""
    paper, official = cls.paper(), cls.official()
    rows = [f"        {f.name} = {getattr(paper, f.name)!r} / {getattr(official, f.name)!r}"
            for f in dataclasses.fields(cls)]

    def wrap(fn):
        fn.__doc__ = (f"{fn.__doc__ or ''}\n\n    Settings keywords ({cls.__name__} fields), "
                      "paper / official value:\n" + "\n".join(rows) + "\n")
        return fn
    return wrap


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
