"""The method rows of an evaluation: `--methods plain,personalize:official,freecus:paper+no-ans`.

    rows = parse_methods("plain,personalize:paper+tau=0.6|0.7|0.8|0.9,freecus:paper+no-caption")
    image = generate(pipe, rows[1], case, seed, height, width, steps, guidance)

A row is METHOD[:PRESET][+MOD...], rows separated by commas:
- METHOD: `plain` (text to image, no reference), `personalize` (Personalize Anything, Pipeline.personalize, in
  place: the subject where it is in the reference) or `freecus` (Pipeline.freecus). PRESET: `paper` (default) or
  `official` (the released code); `plain` takes neither.
- MOD: `FIELD=VALUE` overrides one field of the method's settings dataclass (PersonalizeSettings /
  FreeCusSettings; values as `--set` parses them, e.g. `vital_layers=0,1,2`); `FIELD=A|B|C` sweeps it (one row
  per value; several sweeps make their product), e.g. PA's Table 3 `personalize:paper+tau=0.6|0.7|0.8|0.9`.
- FreeCus' ablations as the paper names them: `no-ans` (mu_shift_type=target: the reference noised on the
  target's schedule), `lambda=1` (λ_r = λ_p = 1: no attention scaling), `no-caption` (no subject caption appended).
- `ref-caption` (FreeCus, minidit's variant): the reference pass gets the subject caption alone as its prompt
  (Reference(prompt=...)) instead of the target's full prompt (infer.py runs both passes with the same prompt),
  so its keys/values do not depend on the prompt and are computed once per subject and seed (sharing, below).

Sharing (`shares`): every image is generated with a refcache.ReferenceCache, so the reference runs in a forward pass
of its own; the runner keeps one cache per (subject, row) for the rows whose reference branch is the same for every
prompt (Personalize Anything; FreeCus with `ref-caption`) and a fresh one that keeps nothing for the others, so
images are the same bits with and without sharing.

Every row is resolved and validated here, before any model loads; an unknown method, preset or field is a
one-line error naming the row. Adding a method later is one entry in METHODS and one branch in `generate`.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from ..freecus import FreeCusSettings
from ..masks import Reference
from ..personalize import PersonalizeSettings
from ..presets import PRESETS
from ..refcache import ReferenceCache

METHODS = {"plain": None, "personalize": PersonalizeSettings, "freecus": FreeCusSettings}
ALIASES = {"freecus": {"no-ans": {"mu_shift_type": "target"}, "lambda=1": {"lambda_ref": 1.0, "lambda_prompt": 1.0}}}
NO_CAPTION = "no-caption"
REF_CAPTION = "ref-caption"


@dataclass(frozen=True)
class Row:
    method: str
    preset: str | None = None
    overrides: tuple[tuple[str, object], ...] = ()
    mods: tuple[str, ...] = ()         # the row's modifiers as written (with one value per sweep)
    caption: bool = True               # freecus: append the subject caption
    ref_caption: bool = False          # freecus: the reference pass's prompt is the caption alone (`ref-caption`)

    @property
    def label(self) -> str:
        head = self.method if self.preset is None else f"{self.method}:{self.preset}"
        return "+".join((head, *self.mods))

    @property
    def tag(self) -> str:
        """The row's folder name under OUT/images: the label with anything but [A-Za-z0-9._=-] as '_'."""
        return re.sub(r"[^A-Za-z0-9._=-]", "_", self.label.replace(":", "-"))

    @property
    def uses_caption(self) -> bool:
        """Whether the subject caption goes into the row's images (appended to the prompt, or `ref-caption`)."""
        return self.method == "freecus" and (self.caption or self.ref_caption)

    @property
    def shares(self) -> bool:
        """Whether the reference branch is the same for every prompt (one subject, one seed)."""
        return self.method == "personalize" or (self.method == "freecus" and self.ref_caption)

    def settings(self):
        cls = METHODS[self.method]
        return None if cls is None else cls.resolve(self.preset, **dict(self.overrides))

    def record(self) -> dict:
        """The resolved settings as recorded per image: preset and every field (plus `caption` for FreeCus)."""
        s = self.settings()
        out = {} if s is None else {"preset": self.preset, **s.asdict()}
        if self.method == "freecus":
            out["caption"] = self.caption
            if self.ref_caption:
                out["ref_caption"] = True
        return out


def split_rows(text: str) -> list[str]:
    """Commas separate rows, except inside a list value (`vital_layers=0,1,2`): a piece that does not start like
    a name (a letter) continues the previous row's value. (A text value cannot hold a comma here.)"""
    rows: list[str] = []
    for piece in text.split(","):
        if rows and "=" in rows[-1].split("+")[-1] and not re.match(r"\s*[A-Za-z]", piece):
            rows[-1] += "," + piece.strip()
        else:
            rows.append(piece.strip())
    return [r for r in rows if r]


def parse_row(text: str) -> list[Row]:
    """One row as written -> one Row per combination of its sweeps."""
    where = f"--methods {text!r}"
    head, *mods = text.split("+")
    name, _, preset = head.partition(":")
    name, preset = name.strip(), preset.strip() or None
    if name not in METHODS:
        raise ValueError(f"{where}: unknown method {name!r} (methods: {', '.join(METHODS)})")
    cls = METHODS[name]
    if cls is None:
        if preset or mods:
            raise ValueError(f"{where}: plain generation takes no preset or settings")
        return [Row(name)]
    preset = preset or "paper"
    if preset not in PRESETS:
        raise ValueError(f"{where}: unknown preset {preset!r} (presets: {', '.join(PRESETS)})")
    fixed: dict[str, object] = {}
    fixed_mods: list[str] = []
    sweeps: list[list[tuple[str, str, object]]] = []  # per swept field: (field, text, value)
    caption, ref_caption = True, False
    for mod in (m.strip() for m in mods):
        alias = ALIASES.get(name, {}).get(mod)
        if alias is not None:
            fixed.update(alias)
            fixed_mods.append(mod)
        elif mod == NO_CAPTION and name == "freecus":
            caption = False
            fixed_mods.append(mod)
        elif mod == REF_CAPTION and name == "freecus":
            ref_caption = True
            fixed_mods.append(mod)
        elif "=" in mod:
            field, _, values = mod.partition("=")
            field = field.strip().replace("-", "_")
            parsed = []
            for v in values.split("|"):
                try:
                    parsed.append((field, v.strip(), cls.parse([f"{field}={v.strip()}"])[field]))
                except ValueError as e:
                    raise ValueError(f"{where}: {str(e).removeprefix('--set: ').removeprefix('--set ')}") from None
            if len(parsed) == 1:
                fixed[field] = parsed[0][2]
                fixed_mods.append(f"{field}={parsed[0][1]}")
            else:
                sweeps.append(parsed)
        else:
            known = sorted(ALIASES.get(name, {})) + ([NO_CAPTION, REF_CAPTION] if name == "freecus" else [])
            raise ValueError(f"{where}: unknown setting {mod!r} (give FIELD=VALUE"
                             + (f" or one of {', '.join(known)})" if known else ")"))
    rows = []
    for combo in itertools.product(*sweeps) if sweeps else [()]:
        over = {**fixed, **{f: v for f, _, v in combo}}
        row = Row(name, preset, tuple(sorted(over.items())),
                  tuple(fixed_mods) + tuple(f"{f}={t}" for f, t, _ in combo), caption, ref_caption)
        try:
            row.settings()  # the dataclass checks every value now, before any model loads
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None
        rows.append(row)
    return rows


def parse_methods(text: str) -> list[Row]:
    rows = [r for item in split_rows(text) for r in parse_row(item)]
    if not rows:
        raise ValueError("--methods: no method given (e.g. plain,personalize:official,freecus:paper)")
    labels = [r.label for r in rows]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"--methods: {', '.join(dup)} given twice")
    tags = [r.tag for r in rows]
    if len(set(tags)) != len(tags):
        raise ValueError(f"--methods: two rows share an output folder name ({', '.join(tags)})")
    return rows


def generate(pipe, row: Row, reference: Reference, prompt: str, caption: str, seed: int, height: int, width: int,
             steps: int, guidance: float, cache: ReferenceCache | None = None):
    """One image of one row (the entry points' own signatures; one image, one seed). Every row samples alike:
    the same size, steps and guidance, and no true CFG (the methods have none; a model's own default true CFG,
    e.g. the built-in model's 4, is not used for plain generation either). `cache`: the row's ReferenceCache
    (None: a fresh one that keeps nothing, so the image is the same bits as with a shared one)."""
    common = dict(height=height, width=width, steps=steps, guidance=guidance, seed=seed)
    if row.method == "plain":
        return pipe.generate(prompt, **common, true_cfg_scale=1.0)[0]
    cache = ReferenceCache(0) if cache is None else cache
    if row.method == "personalize":
        return pipe.personalize(prompt, reference, preset=row.settings(), cache=cache, **common)[0]
    if row.method == "freecus":
        if row.ref_caption:
            reference = Reference(reference.image, reference.mask, caption)
        return pipe.freecus(prompt, reference, caption=caption if row.caption else None, preset=row.settings(),
                            cache=cache, **common)[0]
    raise ValueError(f"unknown method {row.method!r}")
