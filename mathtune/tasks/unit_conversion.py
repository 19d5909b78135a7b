"""Task "unit-conversion": generated one-step unit conversions, deterministic per seed.

Built for the CPU demo (a 135M model, a few hundred training examples): every target is one
worked step that shows the conversion factor, e.g. ``3.5 km × 1000 m/km = 3500 m\\n#### 3500``,
so the model has to learn a factor per unit pair and one multiplication, nothing else. Values are
small (integers 2-99, or halves 0.5-19.5) and arithmetic is exact in ``Decimal``, so no target
carries float noise. Judged within 5 %: "× 1000" and "× 1024" both pass for GB -> MB.
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


@dataclass(frozen=True)
class Unit:
    abbr: str  # in "Convert 3 km to m." and in steps
    name: str  # plural, in "How many meters are in 3 kilometers?"
    per: str = ""  # singular label after "/" in a factor ("16 tbsp/cup"); default abbr

    @property
    def label(self) -> str:
        return self.per or self.abbr


@dataclass(frozen=True)
class Conversion:
    """One direction of one unit pair.

    kind "mul": x src × factor = y dst, x drawn from the value pool.
    kind "div": x src ÷ factor = y dst, y drawn from the pool and x = y × factor, so that going
    to the bigger unit still ends on a clean number (3500 m ÷ 1000 m/km = 3.5 km).
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

    def halves_ok(self) -> bool:
        # int x 3-decimal factor stays within 3 decimals; a half times 1.609 would not
        return self.kind == "div" or self.factor == self.factor.to_integral_value()

    def factor_text(self) -> str:
        # compound units (km/h) make "3.6 (km/h)/(m/s)" unreadable: show the bare factor there
        if "/" in self.src.abbr or "/" in self.dst.abbr:
            return format_number(self.factor)
        big, small = (self.src, self.dst) if self.kind == "mul" else (self.dst, self.src)
        return f"{format_number(self.factor)} {small.abbr}/{big.label}"

    def solve(self, value: Decimal) -> tuple[Decimal, str, Decimal]:
        """``(x, step, y)`` for the drawn ``value``: x goes in the question, y is the gold."""
        s, d = self.src.abbr, self.dst.abbr
        if self.kind == "mul":
            x, y = value, value * self.factor
            return x, f"{_n(x)} {s} × {self.factor_text()} = {_n(y)} {d}", y
        if self.kind == "div":
            x, y = value * self.factor, value
            return x, f"{_n(x)} {s} ÷ {self.factor_text()} = {_n(y)} {d}", y
        if self.kind == "c2f":
            x, y = value, value * 9 / 5 + 32
            return x, f"{_n(x)} {s} × 9/5 + 32 = {_n(y)} {d}", y
        if self.kind == "f2c":
            x, y = value * 9 / 5 + 32, value
            return x, f"({_n(x)} {s} − 32) × 5/9 = {_n(y)} {d}", y
        if self.kind == "c2k":
            x, y = value, value + D("273.15")
            return x, f"{_n(x)} {s} + 273.15 = {_n(y)} {d}", y
        if self.kind == "k2c":
            x, y = value + D("273.15"), value
            return x, f"{_n(x)} {s} − 273.15 = {_n(y)} {d}", y
        raise ValueError(f"unknown conversion kind {self.kind!r}")


def _n(value: Decimal) -> str:
    return format_number(value)


def _pair(category, big, small, factor, inverse=None) -> list[Conversion]:
    """Both directions of ``1 big = factor small``.

    Without ``inverse`` small -> big divides by the factor; with it (awkward factors such as
    2.54, where dividing is hard) small -> big multiplies by the rounded reciprocal instead.
    """
    down = Conversion(category, big, small, "mul", D(factor))
    if inverse is None:
        return [down, Conversion(category, small, big, "div", D(factor))]
    return [down, Conversion(category, small, big, "mul", D(inverse))]


U = Unit
KM, M, CM, MM = U("km", "kilometers"), U("m", "meters"), U("cm", "centimeters"), U("mm", "millimeters")
MI, YD, FT, IN = U("mi", "miles"), U("yd", "yards"), U("ft", "feet"), U("in", "inches")
T, KG, G, MG = U("t", "tonnes"), U("kg", "kilograms"), U("g", "grams"), U("mg", "milligrams")
LB, OZ = U("lb", "pounds"), U("oz", "ounces")
L, ML = U("L", "liters"), U("mL", "milliliters")
GAL, QT, PT = U("gal", "gallons"), U("qt", "quarts"), U("pt", "pints")
CUP, TBSP, TSP = U("cups", "cups", "cup"), U("tbsp", "tablespoons"), U("tsp", "teaspoons")
WEEK, DAY = U("weeks", "weeks", "week"), U("days", "days", "day")
H, MIN, S = U("h", "hours"), U("min", "minutes"), U("s", "seconds")
MPS, KMH = U("m/s", "meters per second"), U("km/h", "kilometers per hour")
MPH, MPM = U("mph", "miles per hour"), U("m/min", "meters per minute")
TB, GB, MB, KB = U("TB", "terabytes"), U("GB", "gigabytes"), U("MB", "megabytes"), U("KB", "kilobytes")
BYTE, BIT = U("bytes", "bytes", "byte"), U("bits", "bits", "bit")
DEG_C, DEG_F, KELVIN = U("°C", "degrees Celsius"), U("°F", "degrees Fahrenheit"), U("K", "kelvins")

CONVERSIONS: dict[str, list[Conversion]] = {
    "length": [
        *_pair("length", KM, M, 1000), *_pair("length", M, CM, 100), *_pair("length", CM, MM, 10),
        *_pair("length", FT, IN, 12), *_pair("length", YD, FT, 3),
        *_pair("length", IN, CM, "2.54", "0.394"), *_pair("length", MI, KM, "1.609", "0.621"),
    ],
    "mass": [
        *_pair("mass", KG, G, 1000), *_pair("mass", G, MG, 1000), *_pair("mass", T, KG, 1000),
        *_pair("mass", LB, OZ, 16), *_pair("mass", KG, LB, "2.205", "0.454"),
    ],
    "volume": [
        *_pair("volume", L, ML, 1000), *_pair("volume", GAL, QT, 4), *_pair("volume", QT, PT, 2),
        *_pair("volume", CUP, TBSP, 16), *_pair("volume", TBSP, TSP, 3),
        *_pair("volume", GAL, L, "3.785", "0.264"),
    ],
    "time": [
        *_pair("time", H, MIN, 60), *_pair("time", MIN, S, 60), *_pair("time", DAY, H, 24),
        *_pair("time", WEEK, DAY, 7), *_pair("time", H, S, 3600),
    ],
    "speed": [
        *_pair("speed", MPS, KMH, "3.6"), *_pair("speed", MPH, KMH, "1.609", "0.621"),
        *_pair("speed", MPS, MPM, 60),
    ],
    "data size": [
        *_pair("data size", TB, GB, 1024), *_pair("data size", GB, MB, 1024),
        *_pair("data size", MB, KB, 1024), *_pair("data size", KB, BYTE, 1024),
        *_pair("data size", BYTE, BIT, 8),
    ],
    "temperature": [
        Conversion("temperature", DEG_C, DEG_F, "c2f"), Conversion("temperature", DEG_F, DEG_C, "f2c"),
        Conversion("temperature", DEG_C, KELVIN, "c2k"), Conversion("temperature", KELVIN, DEG_C, "k2c"),
    ],
}
CATEGORIES: tuple[str, ...] = tuple(CONVERSIONS)

# Phrasings, so that the model must read the units rather than match one fixed sentence.
# {x} value, {sa}/{da} source/target abbreviations, {sn}/{dn} source/target plural names.
GENERIC_TEMPLATES = (
    "Convert {x} {sa} to {da}.",
    "What is {x} {sa} in {dn}?",
    "Express {x} {sn} in {da}.",
    "{x} {sa} = ? {da}",
)
HOW_MANY = "How many {dn} are in {x} {sn}?"  # not for temperature: "how many degrees" misleads
STORY_TEMPLATES = {
    "length": ("A rope is {x} {sa} long. What is its length in {dn}?", "A trail is {x} {sn} long. How long is it in {da}?"),
    "mass": ("A bag of flour weighs {x} {sa}. What is its mass in {dn}?", "A parcel weighs {x} {sn}. How much is that in {da}?"),
    "volume": ("A tank holds {x} {sa} of water. How much is that in {dn}?", "A recipe needs {x} {sn} of milk. How many {dn} is that?"),
    "time": ("A movie lasts {x} {sn}. How long is that in {dn}?", "A trip takes {x} {sa}. How many {dn} is that?"),
    "speed": ("A car travels at {x} {sa}. What is its speed in {da}?", "A cyclist rides at {x} {sn}. How fast is that in {dn}?"),
    "data size": ("A file is {x} {sa}. How big is it in {da}?", "A download is {x} {sn}. What is its size in {dn}?"),
    "temperature": ("The water is at {x} {sa}. What is the temperature in {dn}?", "A thermometer reads {x} {sa}. What is that in {da}?"),
}


def _templates(category: str) -> tuple[str, ...]:
    extra = () if category == "temperature" else (HOW_MANY,)
    return GENERIC_TEMPLATES + extra + STORY_TEMPLATES[category]


def _draw_value(rng: random.Random, conversion: Conversion) -> Decimal:
    if conversion.category == "temperature":
        return D(rng.randint(5, 99))  # away from 0 °C, where a 5 % tolerance would demand exactness
    if conversion.halves_ok() and rng.random() < 0.3:
        return D(rng.randrange(1, 40, 2)) / 2  # 0.5, 1.5, ..., 19.5
    return D(rng.randint(2, 99))


def split_of(problem_key: str) -> str:
    """Stable split of a problem (unit pair and value), independent of seed and phrasing.

    Hashing the problem rather than the sentence keeps every paraphrase of an eval problem out
    of train too; sha256 because Python's ``hash`` of a str changes between processes.
    """
    bucket = int.from_bytes(hashlib.sha256(problem_key.encode()).digest()[:8], "big") % 11
    return "eval" if bucket == 0 else "train"  # 1/11 eval: 500 eval fill as 5000 train do


def category_of(example: Example) -> str:
    """The category an example's id names (ids end in ``-<category>``)."""
    return example.id.rsplit("-", 1)[1].replace("_", " ")


def generate(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[Example]]:
    """Both splits from one RNG: category, direction, value, phrasing; duplicates dropped."""
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    rng = random.Random(seed)
    rows: dict[str, list[Example]] = {split: [] for split in sizes}
    seen: set[str] = set()
    for _ in range(50 * sum(sizes.values())):  # bounded: a too-small problem space must not hang
        if all(len(rows[s]) >= sizes[s] for s in sizes):
            return rows
        category = rng.choice(CATEGORIES)
        conversion = rng.choice(CONVERSIONS[category])
        value = _draw_value(rng, conversion)
        template = rng.choice(_templates(category))
        x, step, y = conversion.solve(value)
        question = template.format(
            x=_n(x), sa=conversion.src.abbr, da=conversion.dst.abbr, sn=conversion.src.name, dn=conversion.dst.name
        )
        split = split_of(f"{conversion.key}:{_n(x)}")
        if question in seen or len(rows[split]) >= sizes[split]:
            continue
        seen.add(question)
        example_id = f"unit-conversion-{split}-{len(rows[split]):05d}-{category.replace(' ', '_')}"
        rows[split].append(Example(example_id, question, f"{step}\n#### {_n(y)}", float(y)))
    raise RuntimeError(f"unit-conversion: could not draw {sizes} distinct questions; widen the value ranges")


class UnitConversionTask(Task):
    name = "unit-conversion"
    judge_rule = "rel_tol=0.05"

    def __init__(self, *, seed: int = 0, sizes: dict[str, int] | None = None):
        super().__init__()
        self.seed = seed
        self.sizes = dict(SPLIT_SIZES if sizes is None else sizes)
        self._generated: dict[str, list[Example]] | None = None

    def _load(self, split: str) -> list[Example]:
        if self._generated is None:  # one pass makes both splits: they share the dedupe set
            self._generated = generate(self.seed, self.sizes)
        return self._generated[split]
