"""Write the sample instruction data of the quickstart: data/sample_train.json and data/sample_heldout.json.

    python data/make_sample.py                       # rewrites both files (byte for byte the same)
    python data/make_sample.py --output_dir /tmp/s   # somewhere else, e.g. to compare with the shipped ones
    python data/make_sample.py --num_train 200 --num_heldout 50 --output_dir /tmp/s   # a tiny variant

Synthetic Alpaca-format records (a JSON list of {"instruction", "input", "output"}, indent 4, as
json.dumps writes it: the paper's format) built so that data selection has something to find:

* 16 task families of clearly different difficulty and length (see FAMILIES below and data/README.md):
  look-ups in fixed tables (capitals, antonyms), copying, upper-casing, reversing a word, counting
  words and letters, parity, addition, multiplication, sorting, unit conversion, continuing a
  sequence, date format conversion, key/value lines to JSON, and short templated prose.
  Each family has several phrasings of its instruction, and families are drawn with unequal weights.
* near-duplicates: about 6% of the training records repeat an earlier record's input and output with
  another phrasing of the instruction (or, one time in three, exactly);
* noise: about 4% of the training records (NOISE_RATE) get a corrupted output, unlearnable by design:
  a random string of letters and digits, or the output of an unrelated record.
  The held-out split is clean (no noise, no planted duplicates) and drawn from the same families, with
  another seed; the fixed-table families can repeat a training question there, as real data does.

Everything comes from random.Random(seed): no dependence on time, hash order or the platform, so
rerunning reproduces the files byte for byte (tests/test_sample_data.py checks it).

The family and noise flag of each record are NOT stored in the records the scripts read; recover
them with ``annotate(records)`` (which regenerates the data with its metadata and matches records by
content) or ``generate(...)``, which returns (record, meta) pairs:

    >>> from data.make_sample import generate, annotate
    >>> pairs = generate(20, seed=0)
    >>> sorted(pairs[0][1])                          # the metadata of one record
    ['family', 'near_duplicate', 'noisy']
    >>> [m["family"] for m in annotate([r for r, _ in pairs[:3]], n=20, seed=0)] == [m["family"] for _, m in pairs[:3]]
    True
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: utils.py

from utils import atomic_write  # noqa: E402

NUM_TRAIN = 2000  # records in data/sample_train.json
NUM_HELDOUT = 300  # records in data/sample_heldout.json
TRAIN_SEED = 1234  # seed of the training split
HELDOUT_SEED = 5678  # seed of the held-out split (another stream: fresh values)
NOISE_RATE = 0.04  # share of training records whose output is corrupted (unlearnable)
DUPLICATE_RATE = 0.06  # share of training records that re-use an earlier record's input/output

WORDS = ["apple", "river", "stone", "cloud", "garden", "window", "silver", "forest", "candle", "ocean", "mirror", "basket", "lantern", "meadow", "pepper", "castle", "rabbit", "violin", "harbor", "pillow", "thunder", "marble", "ribbon", "island", "copper", "feather", "velvet", "orange", "planet", "jacket", "button", "butter", "winter", "summer", "yellow", "market", "bridge", "rocket", "kettle", "sunset", "tiger", "puzzle", "shadow", "cotton", "dragon", "pencil", "spirit", "valley", "wonder", "bottle", "garlic", "turtle", "anchor", "circle"]
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Australia", "Canberra"), ("India", "New Delhi"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("Brazil", "Brasilia"), ("Mexico", "Mexico City"),
    ("Argentina", "Buenos Aires"), ("Turkey", "Ankara"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
]
ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("early", "late"),
    ("open", "closed"), ("full", "empty"), ("strong", "weak"), ("rich", "poor"), ("young", "old"),
    ("loud", "quiet"), ("hard", "soft"), ("wet", "dry"), ("high", "low"), ("clean", "dirty"), ("thick", "thin"),
    ("sharp", "dull"), ("brave", "afraid"), ("near", "far"), ("up", "down"), ("true", "false"),
    ("begin", "end"), ("win", "lose"),
]
UNITS = [  # (from, to, factor)
    ("kilometres", "metres", 1000), ("metres", "centimetres", 100), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("kilograms", "grams", 1000), ("feet", "inches", 12), ("days", "hours", 24),
    ("litres", "millilitres", 1000), ("weeks", "days", 7), ("yards", "feet", 3),
]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"]
ANIMALS = ["fox", "owl", "bear", "deer", "otter", "badger", "heron", "wolf", "hare", "swan", "beaver", "lynx"]
PLACES = ["forest", "river", "valley", "meadow", "mountain", "lake", "marsh", "desert"]
ADJS = ["small", "quiet", "curious", "old", "clever", "shy", "patient", "swift", "gentle", "bold"]
VERBS = ["hunt at night", "sleep in the sun", "watch the water", "gather food", "wander far", "build a nest", "sing at dawn"]
CITIES = ["Lyon", "Porto", "Bergen", "Krakow", "Seville", "Graz", "Turku", "Malmo", "Ghent", "Bari"]
WEATHER = ["sunny", "rainy", "windy", "cloudy", "foggy", "snowy"]
KEYS = ["name", "city", "colour", "animal", "fruit", "sport", "tool"]


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]


# Each family: (weight, instruction phrasings, maker(rng) -> (instruction slot values, input, output)).
# The phrasings may contain "{x}" filled from the slot values.

def _copy(rng):
    s = " ".join(_words(rng, 3, 7))
    return {}, s, s


def _upper(rng):
    s = " ".join(_words(rng, 2, 5))
    return {}, s, s.upper()


def _reverse(rng):
    w = rng.choice(WORDS)
    return {}, w, w[::-1]


def _count_words(rng):
    ws = _words(rng, 2, 12)
    return {}, " ".join(ws), str(len(ws))


def _count_letter(rng):
    w = rng.choice(WORDS)
    c = rng.choice(sorted(set(w)))
    return {"x": c}, w, str(w.count(c))


def _parity(rng):
    n = rng.randint(1, 999)
    return {"x": str(n)}, "", "even" if n % 2 == 0 else "odd"


def _add(rng):
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return {}, f"{a} and {b}", str(a + b)


def _multiply(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return {"x": str(a), "y": str(b)}, "", str(a * b)


def _sort(rng):
    ns = rng.sample(range(1, 100), rng.randint(3, 7))
    return {}, ", ".join(map(str, ns)), ", ".join(map(str, sorted(ns)))


def _convert(rng):
    u_from, u_to, f = rng.choice(UNITS)
    n = rng.randint(1, 20)
    return {"x": f"{n} {u_from}", "y": u_to}, "", f"{n * f} {u_to}"


def _sequence(rng):
    start, step = rng.randint(1, 30), rng.randint(2, 9)
    seq = [start + i * step for i in range(7)]
    return {}, ", ".join(map(str, seq[:4])), ", ".join(map(str, seq[4:]))


def _capital(rng):
    country, city = rng.choice(CAPITALS)
    return {"x": country}, "", f"The capital of {country} is {city}."


def _antonym(rng):
    a, b = rng.choice(ANTONYMS)
    if rng.random() < 0.5:
        a, b = b, a
    return {}, a, b


def _date(rng):
    y, m, d = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return {}, f"{y:04d}-{m:02d}-{d:02d}", f"{MONTHS[m - 1]} {d}, {y}"


def _to_json(rng):
    keys = rng.sample(KEYS, rng.randint(2, 3))
    vals = {k: rng.choice(WORDS) for k in keys}
    return {}, "\n".join(f"{k}: {v}" for k, v in vals.items()), json.dumps(vals)


def _prose(rng):
    animal, place, adj, verb = rng.choice(ANIMALS), rng.choice(PLACES), rng.choice(ADJS), rng.choice(VERBS)
    city, weather = rng.choice(CITIES), rng.choice(WEATHER)
    out = (f"The {adj} {animal} lives near the {place} outside {city}. "
           f"On {weather} days it likes to {verb}, and it always comes home before dark.")
    return {"x": animal, "y": place}, "", out


FAMILIES: dict[str, tuple[float, tuple[str, ...], Callable]] = {
    # name: (relative weight, instruction phrasings, maker)       difficulty / output length
    "capital": (1.0, ("What is the capital of {x}?", "Name the capital city of {x}.",
                      "Which city is the capital of {x}?"), _capital),  # table look-up / one sentence
    "antonym": (0.8, ("Give the opposite of the word.", "Write the antonym of this word.",
                      "What is the opposite of the following word?"), _antonym),  # table look-up / 1 word
    "copy": (1.0, ("Repeat the text exactly.", "Copy the following text.",
                   "Write the text again without changing it."), _copy),  # easy / 3-7 words
    "upper": (0.8, ("Rewrite the text in upper case.", "Convert the text to capital letters."),
              _upper),  # easy-medium / 2-5 words
    "reverse": (1.0, ("Reverse the letters of the word.", "Spell the word backwards."),
                _reverse),  # hard for BPE / 1 word
    "count_words": (0.8, ("How many words are in the text?", "Count the words in the following text."),
                    _count_words),  # medium / a number
    "count_letter": (0.8, ("How many times does the letter {x} appear in the word?",
                           "Count the letter {x} in this word."), _count_letter),  # hard / a digit
    "parity": (0.8, ("Is {x} even or odd?", "Tell whether the number {x} is even or odd."),
               _parity),  # medium / 1 word
    "add": (1.2, ("Add the two numbers.", "What is the sum of these numbers?", "Compute the total."),
            _add),  # hard / 2-4 digits
    "multiply": (0.8, ("What is {x} times {y}?", "Multiply {x} by {y}."), _multiply),  # table / 1-3 digits
    "sort": (1.0, ("Sort the numbers in ascending order.", "Arrange these numbers from smallest to largest."),
             _sort),  # medium / 3-7 numbers
    "convert": (1.0, ("Convert {x} to {y}.", "How many {y} are there in {x}?"), _convert),  # medium / number + unit
    "sequence": (0.8, ("Continue the sequence with three more numbers.", "What are the next three numbers?"),
                 _sequence),  # medium / 3 numbers
    "date": (0.8, ("Rewrite the date in words.", "Convert the ISO date to a written date."),
             _date),  # format conversion / 3 tokens-ish
    "to_json": (0.7, ("Convert the lines to a JSON object.", "Turn these key: value lines into JSON."),
                _to_json),  # format conversion / longer
    "prose": (0.8, ("Write two sentences about a {x} that lives near a {y}.",
                    "Describe a {x} living by a {y} in two sentences."), _prose),  # templated prose / longest
}


def _make(rng: random.Random, family: str) -> dict:
    _, phrasings, maker = FAMILIES[family]
    slots, inp, out = maker(rng)
    instruction = rng.choice(phrasings).format(**slots)
    return {"instruction": instruction, "input": inp, "output": out}


def _corrupt(rng: random.Random, record: dict, pool: list[tuple[dict, dict]]) -> dict:
    """An unlearnable output: random letters and digits, or the output of a record of another family."""
    if rng.random() < 0.5 or not pool:
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
        n = max(3, min(40, len(record["output"])))
        out = "".join(rng.choice(alphabet) for _ in range(n))
    else:
        out = rng.choice(pool)[0]["output"]
    if out == record["output"]:  # never correct by accident
        out = out[::-1] + "x"
    return {**record, "output": out}


def generate(n: int, seed: int = TRAIN_SEED, noise_rate: float = NOISE_RATE,
             duplicate_rate: float = DUPLICATE_RATE) -> list[tuple[dict, dict]]:
    """``n`` (record, meta) pairs; meta = {"family", "noisy", "near_duplicate"}. Deterministic in
    its arguments. Noise and duplicates are planted at exact counts (round(rate * n)) at random
    positions; the order is shuffled so that any prefix is a representative sample."""
    rng = random.Random(seed)
    names = list(FAMILIES)
    weights = [FAMILIES[f][0] for f in names]
    n_dup = round(duplicate_rate * n)
    n_noise = round(noise_rate * n)
    pairs: list[tuple[dict, dict]] = []
    for _ in range(n - n_dup):
        fam = rng.choices(names, weights)[0]
        pairs.append((_make(rng, fam), {"family": fam, "noisy": False, "near_duplicate": False}))
    for _ in range(n_dup):  # near-duplicates of earlier clean records
        rec, meta = rng.choice(pairs[: n - n_dup])
        if rng.random() < 1 / 3:
            dup = dict(rec)
        else:
            others = [p for p in FAMILIES[meta["family"]][1] if "{" not in p and p != rec["instruction"]]
            dup = {**rec, "instruction": rng.choice(others)} if others else dict(rec)
        pairs.append((dup, {"family": meta["family"], "noisy": False, "near_duplicate": True}))
    noisy = rng.sample(range(n), n_noise)
    for i in sorted(noisy):
        rec, meta = pairs[i]
        pool = [p for p in pairs if p[1]["family"] != meta["family"]]
        pairs[i] = (_corrupt(rng, rec, pool), {**meta, "noisy": True})
    rng.shuffle(pairs)
    return pairs


def _key(record: dict) -> str:
    return json.dumps([record.get("instruction"), record.get("input", ""), record.get("output")])


def annotate(records: list[dict], n: int = NUM_TRAIN, seed: int = TRAIN_SEED, noise_rate: float = NOISE_RATE,
             duplicate_rate: float = DUPLICATE_RATE) -> list[dict]:
    """The meta of each record ({"family", "noisy", "near_duplicate"}), found by regenerating the
    split (``generate(n, seed, noise_rate, duplicate_rate)``) and matching records by content, so a
    subset or a prefix of the split is annotated too. Identical records share one meta (family and
    noise flag are then the same; "near_duplicate" is that of the first copy). Raises ValueError for
    a record the generator does not produce."""
    index: dict[str, dict] = {}
    for rec, meta in generate(n, seed, noise_rate, duplicate_rate):
        index.setdefault(_key(rec), meta)  # identical records carry identical family/noise
    out = []
    for i, r in enumerate(records):
        meta = index.get(_key(r))
        if meta is None:
            raise ValueError(f"record {i} is not one of the generated sample records: {r!r}")
        out.append(meta)
    return out


def annotate_heldout(records: list[dict], n: int = NUM_HELDOUT, seed: int = HELDOUT_SEED) -> list[dict]:
    """``annotate`` for the held-out split (generated clean: no noise, no planted duplicates)."""
    return annotate(records, n, seed, 0.0, 0.0)


def dumps(records: list[dict]) -> str:
    """The file format: json.dumps defaults with indent 4, no final newline (the paper's, like its subsets)."""
    return json.dumps(records, indent=4)


def write_split(path: str, n: int, seed: int, noise_rate: float, duplicate_rate: float) -> list[tuple[dict, dict]]:
    pairs = generate(n, seed, noise_rate, duplicate_rate)
    with atomic_write(path) as f:
        f.write(dumps([r for r, _ in pairs]))
    return pairs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--output_dir", default=os.path.dirname(os.path.abspath(__file__)),
                   help="folder for sample_train.json and sample_heldout.json (default: this data/ folder)")
    p.add_argument("--num_train", type=int, default=NUM_TRAIN, help="training records (default 2000)")
    p.add_argument("--num_heldout", type=int, default=NUM_HELDOUT, help="held-out records (default 300)")
    p.add_argument("--seed", type=int, default=TRAIN_SEED, help="seed of the training split (default 1234)")
    p.add_argument("--heldout_seed", type=int, default=HELDOUT_SEED, help="seed of the held-out split (default 5678)")
    p.add_argument("--noise_rate", type=float, default=NOISE_RATE, help="share of corrupted training outputs (0.04)")
    p.add_argument("--duplicate_rate", type=float, default=DUPLICATE_RATE,
                   help="share of near-duplicate training records (0.06)")
    args = p.parse_args(argv)
    if args.num_train < 1 or args.num_heldout < 1:
        p.error("--num_train and --num_heldout must be >= 1")
    if not (0 <= args.noise_rate < 1 and 0 <= args.duplicate_rate < 1):
        p.error("--noise_rate and --duplicate_rate must be in [0, 1)")
    return args


def main(args=None):
    if args is None or isinstance(args, list):
        args = parse_args(args)
    from collections import Counter

    for name, n, seed, noise, dup in (("sample_train.json", args.num_train, args.seed, args.noise_rate,
                                       args.duplicate_rate),
                                      ("sample_heldout.json", args.num_heldout, args.heldout_seed, 0.0, 0.0)):
        path = os.path.join(args.output_dir, name)
        pairs = write_split(path, n, seed, noise, dup)
        fams = Counter(m["family"] for _, m in pairs)
        n_noisy = sum(m["noisy"] for _, m in pairs)
        n_dup = sum(m["near_duplicate"] for _, m in pairs)
        print(f"{path}: {n} records, {len(fams)} families, {n_noisy} noisy, {n_dup} near-duplicates")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from utils import run_cli

    sys.exit(run_cli(main))
