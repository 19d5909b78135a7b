"""Task "unit-conversion": generated one-step unit conversions, deterministic per seed.

Built for the CPU demo, where a 135M model sees a few hundred to ~1000 examples: every target
is one worked step that shows the factor, ``3.5 km × 1000 m/km = <<3.5*1000=3500>>3500 m\\n#### 3500``,
so the model learns one factor per unit pair and the expression; the calculator annotation lets
calculator-assisted decoding do the arithmetic. Factors are kept easy (10, 100,
1000, 60, 24, 8, 3.6 and the temperature formulas) and so are values: 2-99 or a half (0.5-19.5)
next to powers of ten, 2-20 or a half (0.5-9.5) next to the other factors, whole degrees
5-99 °C. Arithmetic is exact in ``Decimal``: no target carries float noise. Judged within 5 %.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from decimal import Decimal

from mathtune.answers import format_number
from mathtune.tasks import Example, Task

D = Decimal
SPLIT_SIZES = {"train": 5000, "eval": 500}
# A digit shift: any value 2-99 is fine. 1024 is not here: in a demo run the 135M model got
# 35 % of "87040 GB ÷ 1024 GB/TB" rows right (mostly digit-count slips) against 75 % for shifts
# by 1000, so data sizes use SI prefixes (1 GB = 1000 MB); binary 1024 is within 5 % of them.
EASY_FACTORS = (10, 100, 1000)


@dataclass(frozen=True)
class Unit:
    abbr: str  # in "Convert 3 km to m." and in steps
    name: str  # plural, in "How many meters are in 3 kilometers?"
    per: str = ""  # singular label after "/" in a factor ("24 h/day"); default abbr

    @property
    def label(self) -> str:
        return self.per or self.abbr


@dataclass(frozen=True)
class Conversion:
    """One direction of one unit pair.

    kind "mul": x src × factor = y dst, x drawn from the value pool.
    kind "div": x src ÷ factor = y dst, y drawn and x = y × factor, so that going to the bigger
    unit still ends on a clean number (3500 m ÷ 1000 m/km = 3.5 km).
    kinds "c2f", "f2c", "c2k", "k2c": temperature, affine; the Celsius side is drawn.
    """

    category: str
    src: Unit
    dst: Unit
    kind: str
    factor: Decimal = D(1)

    @property
    def key(self) -> str:
        return f"{self.src.abbr}->{self.dst.abbr}"

    def factor_text(self) -> str:
        # compound units would read "3.6 (km/h)/(m/s)": show the bare factor for those
        if "/" in self.src.abbr or "/" in self.dst.abbr:
            return _n(self.factor)
        big, small = (self.src, self.dst) if self.kind == "mul" else (self.dst, self.src)
        return f"{_n(self.factor)} {small.abbr}/{big.label}"

    def solve(self, value: Decimal) -> tuple[Decimal, str, Decimal]:
        """``(x, step, y)`` for the drawn ``value``: x goes in the question, y is the gold.

        The step carries a GSM8K-style calculator annotation before the result,
        ``3.5 km × 1000 m/km = <<3.5*1000=3500>>3500 m``: the model learns to write the expression,
        and calculator-assisted decoding (on by default for this task) computes the result, which is
        where a 135M model goes wrong (19 h × 60 = 1080, 31 °C × 9/5 + 32 = 109.2 in demo runs).
        """
        s, d = self.src.abbr, self.dst.abbr
        if self.kind == "mul":
            x, y = value, value * self.factor
            return x, f"{_n(x)} {s} × {self.factor_text()} = {_calc(f'{_n(x)}*{_n(self.factor)}', y)} {d}", y
        if self.kind == "div":
            x, y = value * self.factor, value
            return x, f"{_n(x)} {s} ÷ {self.factor_text()} = {_calc(f'{_n(x)}/{_n(self.factor)}', y)} {d}", y
        if self.kind == "c2f":
            x, y = value, value * 9 / 5 + 32
            return x, f"{_n(x)} {s} × 9/5 + 32 = {_calc(f'{_n(x)}*9/5+32', y)} {d}", y
        if self.kind == "f2c":
            x, y = value * 9 / 5 + 32, value
            return x, f"({_n(x)} {s} − 32) × 5/9 = {_calc(f'({_n(x)}-32)*5/9', y)} {d}", y
        if self.kind == "c2k":
            x, y = value, value + D("273.15")
            return x, f"{_n(x)} {s} + 273.15 = {_calc(f'{_n(x)}+273.15', y)} {d}", y
        if self.kind == "k2c":
            x, y = value + D("273.15"), value
            return x, f"{_n(x)} {s} − 273.15 = {_calc(f'{_n(x)}-273.15', y)} {d}", y
        raise ValueError(f"unknown conversion kind {self.kind!r}")


def _calc(expression: str, result: Decimal) -> str:
    """``<<EXPR=RESULT>>RESULT``, the annotation calculator-assisted decoding completes."""
    return f"<<{expression}={_n(result)}>>{_n(result)}"


def _n(value: Decimal) -> str:
    return format_number(value)


def _pair(category: str, big: Unit, small: Unit, factor) -> list[Conversion]:
    """Both directions of ``1 big = factor small``: multiply going down, divide going up."""
    factor = D(factor)
    return [Conversion(category, big, small, "mul", factor), Conversion(category, small, big, "div", factor)]


U = Unit
KM, M, CM, MM = U("km", "kilometers"), U("m", "meters"), U("cm", "centimeters"), U("mm", "millimeters")
T, KG, G, MG = U("t", "tonnes"), U("kg", "kilograms"), U("g", "grams"), U("mg", "milligrams")
M3, L, ML = U("m³", "cubic meters"), U("L", "liters"), U("mL", "milliliters")
DAY, H, MIN, S = U("days", "days", "day"), U("h", "hours"), U("min", "minutes"), U("s", "seconds")
KMS, MPS = U("km/s", "kilometers per second"), U("m/s", "meters per second")
KMH, MPM = U("km/h", "kilometers per hour"), U("m/min", "meters per minute")
TB, GB, MB, KB = U("TB", "terabytes"), U("GB", "gigabytes"), U("MB", "megabytes"), U("KB", "kilobytes")
BYTE, BIT = U("bytes", "bytes", "byte"), U("bits", "bits", "bit")
DEG_C, DEG_F, KELVIN = U("°C", "degrees Celsius"), U("°F", "degrees Fahrenheit"), U("K", "kelvins")

# Few pairs on purpose: in the demo every extra factor costs examples the model does not get.
# A first version with 31 pairs, imperial ones (2.54, 1.609, 0.4536) and 1024 among them,
# reached 0.17 after 320 examples; this set (then with weeks too) 0.72 after 1200, base 0.045.
CONVERSIONS: dict[str, list[Conversion]] = {
    "length": [*_pair("length", KM, M, 1000), *_pair("length", M, CM, 100), *_pair("length", CM, MM, 10)],
    "mass": [*_pair("mass", KG, G, 1000), *_pair("mass", G, MG, 1000), *_pair("mass", T, KG, 1000)],
    "volume": [*_pair("volume", L, ML, 1000), *_pair("volume", M3, L, 1000)],
    # no weeks <-> days: with "days" also the source of "× 24 h/day", the model multiplied
    # where it should divide (1 of 6 right in a demo run against 14 of 24 for the other pairs)
    "time": [*_pair("time", H, MIN, 60), *_pair("time", MIN, S, 60), *_pair("time", DAY, H, 24)],
    "speed": [
        *_pair("speed", KMS, MPS, 1000), *_pair("speed", MPS, KMH, "3.6"), *_pair("speed", MPS, MPM, 60),
    ],
    "data size": [  # SI prefixes: see EASY_FACTORS for why not 1024
        *_pair("data size", TB, GB, 1000), *_pair("data size", GB, MB, 1000),
        *_pair("data size", MB, KB, 1000), *_pair("data size", BYTE, BIT, 8),
    ],
    "temperature": [
        Conversion("temperature", DEG_C, DEG_F, "c2f"), Conversion("temperature", DEG_F, DEG_C, "f2c"),
        Conversion("temperature", DEG_C, KELVIN, "c2k"), Conversion("temperature", KELVIN, DEG_C, "k2c"),
    ],
}
CATEGORIES: tuple[str, ...] = tuple(CONVERSIONS)

# Several phrasings, so that the model must read the units rather than match one sentence.
# {x} value, {sa}/{da} source/target abbreviations, {sn}/{dn} source/target plural names.
GENERIC_TEMPLATES = (
    "Convert {x} {sa} to {da}.",
    "What is {x} {sa} in {dn}?",
    "Express {x} {sn} in {da}.",
    "{x} {sa} = ? {da}",
)
HOW_MANY = "How many {dn} are in {x} {sn}?"  # not for temperature: "how many degrees" misleads
STORY_TEMPLATES = {
    "length": (
        "A rope is {x} {sa} long. What is its length in {dn}?",
        "A trail is {x} {sn} long. How long is it in {da}?",
    ),
    "mass": (
        "A bag of flour weighs {x} {sa}. What is its mass in {dn}?",
        "A load weighs {x} {sn}. How much is that in {da}?",
    ),
    "volume": (
        "A tank holds {x} {sa} of water. How much is that in {dn}?",
        "A pool contains {x} {sn} of water. How many {dn} is that?",
    ),
    "time": (
        "A job takes {x} {sn}. How long is that in {dn}?",
        "A timer is set to {x} {sa}. How many {dn} is that?",
    ),
    "speed": (
        "An object moves at {x} {sa}. What is its speed in {da}?",
        "A probe travels at {x} {sn}. How fast is that in {dn}?",
    ),
    "data size": (
        "A file is {x} {sa}. How big is it in {da}?",
        "A download is {x} {sn}. What is its size in {dn}?",
    ),
    "temperature": (
        "The water is at {x} {sa}. What is the temperature in {dn}?",
        "A thermometer reads {x} {sa}. What is that in {da}?",
    ),
}


def _templates(category: str) -> tuple[str, ...]:
    extra = () if category == "temperature" else (HOW_MANY,)
    return GENERIC_TEMPLATES + extra + STORY_TEMPLATES[category]


def _draw_value(rng: random.Random, conversion: Conversion) -> Decimal:
    """The drawn side of a conversion: small, so the multiplication stays learnable."""
    if conversion.category == "temperature":
        return D(rng.randint(5, 99))  # away from 0 °C, where a 5 % tolerance demands exactness
    if conversion.factor in EASY_FACTORS:
        if rng.random() < 0.3:
            return D(rng.randrange(1, 40, 2)) / 2  # 0.5, 1.5, ..., 19.5
        return D(rng.randint(2, 99))
    if rng.random() < 0.2:
        return D(rng.randrange(1, 20, 2)) / 2  # 0.5, 1.5, ..., 9.5
    return D(rng.randint(2, 20))  # 20 h × 60 min/h: a times-table step, not long multiplication


def split_of(problem_key: str) -> str:
    """Stable split of a problem (unit pair and value), independent of seed and phrasing.

    Hashing the problem rather than the sentence keeps every paraphrase of an eval problem out
    of train too; sha256 because Python's ``hash`` of a str changes between processes.
    """
    bucket = int.from_bytes(hashlib.sha256(problem_key.encode()).digest()[:8], "big") % 11
    return "eval" if bucket == 0 else "train"  # 1/11: 500 eval rows fill as 5000 train rows do


def category_of(example: Example) -> str:
    """The category an example's id names (ids end in ``-<category>``)."""
    return example.id.rsplit("-", 1)[1].replace("_", " ")


def _quotas(size: int) -> dict[str, int]:
    """Rows per category in a split: equal shares, so every category is in every split."""
    share, extra = divmod(size, len(CATEGORIES))
    return {category: share + (i < extra) for i, category in enumerate(CATEGORIES)}


def generate(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[Example]]:
    """Both splits from one RNG: category, direction, value, phrasing; duplicate questions dropped."""
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    rng = random.Random(seed)
    rows: dict[str, list[Example]] = {split: [] for split in sizes}
    left = {split: _quotas(size) for split, size in sizes.items()}
    seen: set[str] = set()
    for _ in range(100 * sum(sizes.values())):  # bounded: a too-small problem space must not hang
        if not any(any(quota.values()) for quota in left.values()):
            return rows
        category = rng.choice(CATEGORIES)
        conversion = rng.choice(CONVERSIONS[category])
        x, step, y = conversion.solve(_draw_value(rng, conversion))
        src, dst = conversion.src, conversion.dst
        template = rng.choice(_templates(category))
        question = template.format(x=_n(x), sa=src.abbr, da=dst.abbr, sn=src.name, dn=dst.name)
        split = split_of(f"{conversion.key}:{_n(x)}")
        if question in seen or not left[split][category]:
            continue
        seen.add(question)
        left[split][category] -= 1
        example_id = f"unit-conversion-{split}-{len(rows[split]):05d}-{category.replace(' ', '_')}"
        rows[split].append(Example(example_id, question, f"{step}\n#### {_n(y)}", float(y)))
    short = {split: {c: n for c, n in quota.items() if n} for split, quota in left.items()}
    raise RuntimeError(f"unit-conversion: too few distinct questions, missing {short}; widen value ranges")


class UnitConversionTask(Task):
    name = "unit-conversion"
    judge_rule = "rel_tol=0.05"
    calculator_by_default = True  # generated targets carry the conversion as a <<a*b=c>> annotation
    generated = True  # rows made in code from --seed: no files

    def __init__(self, *, seed: int = 0, sizes: dict[str, int] | None = None):
        super().__init__()
        self.seed = seed
        self.sizes = dict(SPLIT_SIZES if sizes is None else sizes)
        self._generated: dict[str, list[Example]] | None = None

    def _load(self, split: str) -> list[Example]:
        if self._generated is None:  # one pass makes both splits: they share the dedupe set
            self._generated = generate(self.seed, self.sizes)
        return self._generated[split]
