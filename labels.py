"""A run's label set: the classes' readable names, other names a caption may use, optional groups, and reading a
class (or a group) back out of a caption. Oxford-IIIT Pet's 37 breeds, with their species and aliases, are one
built-in label set (OXFORD_PETS); any other comes from the data (class folders, ClassLabel names, label strings)
and an optional --label_names file.
"""

import csv
import functools
import json
import os
import re
import string
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from run_io import UserError

UNKNOWN = -1  # the caption names no class
PETS_TEMPLATE = "A photo of {article} {breed}, a type of pet."
GENERIC_TEMPLATE = "A photo of {article} {label}."
TEMPLATE_FIELDS = {"label", "breed", "article", "group"}  # {breed}: the same as {label}, as pets templates say it


def normalise_text(text: str) -> str:
    """Lower-case words of letters and digits, accents dropped (BLIP's tokenizer drops them too), space-padded."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower().replace("st.", "st ").replace("-", " ")
    return " " + " ".join(re.sub(r"[^a-z0-9 ]", " ", text).split()) + " "


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


# Release prefixes of class folder names: CUB-200's numbering ("001.Black_footed_Albatross") and Stanford
# Dogs' WordNet ids ("n02085620-Chihuahua")
_RELEASE_PREFIX = re.compile(r"^(\d{1,4}[._]|n\d{8}[-_])(?=[^\W\d_])")


def readable_name(raw: str) -> str:
    """The name a person reads: release prefixes dropped, underscores as spaces; readable names stay as they are."""
    name = _RELEASE_PREFIX.sub("", str(raw).strip())
    return " ".join(name.replace("_", " ").split()) or str(raw).strip()


def check_template(template: str, flag: str = "--caption_template") -> set:
    """The fields of a caption template; UserError unless it names the class ({label} or {breed}) and uses
    only the fields a caption can fill."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise UserError(f"{flag} {template!r} is not a valid template ({e})") from e
    unknown = fields - TEMPLATE_FIELDS
    if unknown or not fields & {"label", "breed"}:
        raise UserError(
            f"{flag} {template!r} must contain {{label}} (or {{breed}}) and may use {{article}} and {{group}}"
            + (f"; it has {{{', '.join(sorted(unknown))}}}" if unknown else "")
        )
    return fields


@dataclass
class LabelSet:
    """Classes 0..N-1: `names` are what captions and reports say, `keys` how the data spells them.

    aliases: per class, other names a caption may use for it (empty tuple: none).
    groups: per class, a coarser class (species for pets); empty: the set has no groups.
    group_words: per group, words that name the group in a caption besides the group's own name.
    """

    names: tuple
    keys: tuple
    aliases: tuple = ()
    groups: tuple = ()
    group_words: dict = field(default_factory=dict)
    group_kind: str = "group"  # what a group is called in reports ("species" for pets)
    kind: str = "class"  # what a class is called in reports ("breed" for pets)
    # the classes in the order their aliases are tried after every name (ties of equal length): default, class order
    alias_order: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        self.names, self.keys = tuple(self.names), tuple(self.keys)
        self.aliases = tuple(tuple(a) for a in self.aliases) or tuple(() for _ in self.names)
        self.groups = tuple(self.groups)
        if len(self.keys) != len(self.names) or len(self.aliases) != len(self.names):
            raise ValueError("names, keys and aliases must have one entry per class")
        if self.groups and len(self.groups) != len(self.names):
            raise ValueError("groups must have one entry per class")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def plural(self) -> str:
        """What the classes are called in reports: "breeds", "classes"."""
        return self.kind + ("es" if self.kind.endswith(("s", "sh", "ch", "x")) else "s")

    @property
    def is_pets(self) -> bool:
        return self.names == OXFORD_PETS.names and self.groups == OXFORD_PETS.groups

    @functools.cached_property
    def _lookup(self) -> dict:
        """Every spelling of every class (key, name, alias; as written, lower-cased, normalised) -> index."""
        table = {}
        for i in range(len(self)):
            for spelling in (self.keys[i], self.names[i], *self.aliases[i]):
                words = normalise_text(spelling).strip()
                for form in (spelling, spelling.lower(), words, words.replace(" ", "")):
                    table.setdefault(form, i)
        return table

    def index(self, label: Any) -> int:
        """Class index from an int or any spelling of a class name; ValueError if unknown."""
        if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
            if 0 <= int(label) < len(self):
                return int(label)
            raise ValueError(f"class index {label} is outside 0-{len(self) - 1}")
        text = str(label).strip()
        words = normalise_text(text).strip()
        for form in (text, text.lower(), words, words.replace(" ", ""), normalise_text(readable_name(text)).strip()):
            if form in self._lookup:
                return self._lookup[form]
        raise ValueError(f"unknown class {label!r}")

    def caption(self, label: int, template: str) -> str:
        name = self.names[label]
        group = self.groups[label] if self.groups else ""
        return template.format(label=name, breed=name, article=article(name), group=group)

    @functools.cached_property
    def phrases(self) -> list:
        """(normalised name or alias, class index), longest first: what from_caption looks for."""
        pairs = {}
        spellings = [(name, i) for i, name in enumerate(self.names)]
        spellings += [(alias, i) for i in (self.alias_order or range(len(self))) for alias in self.aliases[i]]
        for spelling, i in spellings:
            pairs.setdefault(normalise_text(spelling).strip(), i)
        return sorted(((p, i) for p, i in pairs.items() if p), key=lambda p: -len(p[0]))

    def from_caption(self, caption: str) -> int:
        """Index of the class a caption names, UNKNOWN if none; the longest matching name wins.

        Matching is on normalised whole words (plural 's'/'es' allowed), so "pit bull" does not beat
        "American Pit Bull Terrier", and "pug" does not match inside "pugnacious".
        """
        text = normalise_text(caption)
        for phrase, label in self.phrases:  # longest first
            if f" {phrase} " in text or f" {phrase}s " in text or f" {phrase}es " in text:
                return label
        return UNKNOWN

    def from_captions(self, captions: list) -> np.ndarray:
        """The class each caption names (UNKNOWN for none): what every accuracy of the captions counts."""
        return np.array([self.from_caption(c) for c in captions], dtype=int)

    def group_of(self, label: int) -> Optional[str]:
        return self.groups[label] if self.groups and label != UNKNOWN else None

    @functools.cached_property
    def _group_word_table(self) -> dict:
        table = {}
        for group in dict.fromkeys(self.groups):
            for word in (group, *self.group_words.get(group, ())):
                table.setdefault(normalise_text(word).strip(), group)
        return table

    def group_from_caption(self, caption: str) -> Optional[str]:
        """The group a caption names: its class's group, else a word of exactly one group; None if unclear."""
        label = self.from_caption(caption)
        if label != UNKNOWN:
            return self.group_of(label)
        text = normalise_text(caption)
        named = {g for phrase, g in self._group_word_table.items() if f" {phrase} " in text}
        return named.pop() if len(named) == 1 else None

    def group_words_flat(self) -> set:
        """Every word that names a group (cat, kitten, dog, ...), normalised: what a caption's subject may be."""
        return set(self._group_word_table)

    def check_template(self, template: str, flag: str = "--caption_template") -> None:
        """UserError unless `template` is a caption template this label set can fill (check_template, and {group}
        only where the set has groups)."""
        fields = check_template(template, flag)
        if "group" in fields and not self.groups:
            raise UserError(
                f"{flag} {template!r} uses {{group}}, but this label set has no groups "
                "(give them in a --label_names file)"
            )

    def default_template(self) -> str:
        return PETS_TEMPLATE if self.is_pets else GENERIC_TEMPLATE

    def to_json(self) -> dict:
        return {
            "names": list(self.names),
            "keys": list(self.keys),
            "aliases": [list(a) for a in self.aliases],
            "groups": list(self.groups),
            "group_words": {g: sorted(w) for g, w in self.group_words.items()},
            "group_kind": self.group_kind,
            "kind": self.kind,
        }

    @classmethod
    def from_json(cls, data: dict, source: str) -> "LabelSet":
        """A label set saved by to_json; one UserError line when `source` (a file) holds something else."""
        try:
            names, keys = data["names"], data["keys"]
            if not all(isinstance(n, str) and n for n in names + keys):
                raise ValueError("names and keys must be non-empty strings")
            labels = cls(
                names,
                keys,
                aliases=data.get("aliases") or (),
                groups=data.get("groups") or (),
                group_words={g: set(w) for g, w in (data.get("group_words") or {}).items()},
                group_kind=data.get("group_kind", "group"),
                kind=data.get("kind", "class"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{source} is not a label set written by this project ({type(e).__name__}: {e})") from e
        return OXFORD_PETS if labels.to_json() == OXFORD_PETS.to_json() else labels


def from_class_names(raw_names: list) -> LabelSet:
    """The label set of a data set's class names (ClassLabel names, folder names, label strings), in that order.

    Class names that are all Oxford-IIIT Pet breeds give the built-in 37-breed set (its names, species and
    aliases; classes the data lacks stay in it, so a pets run ranks all 37 as always).
    """
    raw_names = [str(n) for n in raw_names]
    if raw_names and all(_is_breed(n) for n in raw_names):
        return OXFORD_PETS
    names = [readable_name(n) for n in raw_names]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        # two release names that read the same ("001.Crow", "002.Crow"): keep them apart by their raw names
        names = [raw if name in repeated else name for raw, name in zip(raw_names, names)]
    return LabelSet(names, raw_names)


def _is_breed(name: str) -> bool:
    try:
        OXFORD_PETS.index(name)
    except ValueError:
        return False
    return True


def with_label_names(labels: LabelSet, path: str) -> LabelSet:
    """`labels` with the display names, aliases and groups of a --label_names file (JSON or CSV).

    JSON: {"<class as the data names it>": "display name"} or {...: {"name": ..., "aliases": [...], "group": ...}}.
    CSV: a header with `label` and `name`, optional `aliases` (separated by '|') and `group`.
    Every class the file names must exist; a display name may not be used twice; classes it leaves out keep theirs.
    """
    entries = _read_label_names(path)
    names, aliases, groups = list(labels.names), [list(a) for a in labels.aliases], list(labels.groups)
    if not groups and any(e.get("group") for e in entries.values()):
        groups = [""] * len(labels)
    unknown = []
    for key, entry in entries.items():
        try:
            i = labels.index(key)
        except ValueError:
            unknown.append(key)
            continue
        names[i] = entry.get("name") or names[i]
        aliases[i] = list(dict.fromkeys([*aliases[i], *entry.get("aliases", [])]))
        if entry.get("group"):
            groups[i] = entry["group"]
    if unknown:
        raise UserError(
            f"--label_names {path} names {len(unknown)} classes the data set does not have (first: "
            f"{', '.join(map(repr, unknown[:3]))}); its classes are {', '.join(labels.keys[:5])}"
            f"{', ...' if len(labels) > 5 else ''}"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"--label_names {path} gives two classes the name {repeated[0]!r}: each name once")
    if groups and not all(groups):
        missing = [labels.keys[i] for i, g in enumerate(groups) if not g]
        raise UserError(
            f"--label_names {path} gives groups to some classes but not to {len(missing)} (first: {missing[0]!r}): "
            "give every class a group, or none"
        )
    same = labels.is_pets and names == list(labels.names) and groups == list(labels.groups)
    return LabelSet(
        names,
        labels.keys,
        aliases=aliases,
        groups=groups,
        group_words=labels.group_words if same else {},
        group_kind=labels.group_kind if same else "group",
        kind=labels.kind,
    )


def _read_label_names(path: str) -> dict:
    """{class key: {"name", "aliases", "group"}} from a --label_names file; one UserError line when unreadable."""
    if not os.path.isfile(path):
        raise UserError(f"--label_names {path!r} is not a file; pass a JSON or CSV file")
    try:
        with open(path, encoding="utf-8-sig") as f:
            if path.lower().endswith(".json"):
                raw = json.load(f)
                if not isinstance(raw, dict):
                    raise ValueError("the JSON must be an object: {class: name or {name, aliases, group}}")
                rows = {str(k): v if isinstance(v, dict) else {"name": v} for k, v in raw.items()}
            else:
                reader = csv.DictReader(f)
                if not reader.fieldnames or not {"label", "name"} <= set(reader.fieldnames):
                    raise ValueError("the CSV needs a header with columns label and name (aliases, group optional)")
                rows = {}
                for row in reader:
                    if row["label"] in rows:
                        raise ValueError(f"class {row['label']!r} is listed twice")
                    aliases = [a.strip() for a in (row.get("aliases") or "").split("|") if a.strip()]
                    rows[row["label"]] = {"name": row["name"] or None, "aliases": aliases, "group": row.get("group")}
        for key, entry in rows.items():
            name, aliases, group = entry.get("name"), entry.get("aliases", []), entry.get("group")
            if name is not None and not (isinstance(name, str) and name.strip()):
                raise ValueError(f"class {key!r}: the name must be a non-empty string")
            if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
                raise ValueError(f"class {key!r}: aliases must be a list of strings")
            if group is not None and not isinstance(group, str):
                raise ValueError(f"class {key!r}: the group must be a string")
            entry["name"] = name.strip() if name else None
            entry["aliases"] = [a.strip() for a in aliases]
            entry["group"] = group.strip() if group else None
    except (OSError, ValueError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"--label_names {path} cannot be read: {e}") from e
    return rows


# ---------------------------------------------------------------------------
# Oxford-IIIT Pet

# The 37 breeds in the official class-id order (class id = index + 1). Cat breeds
# are capitalised in the official file names, dogs are not.
BREEDS = [
    "Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle",
    "Bengal", "Birman", "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau",
    "english_cocker_spaniel", "english_setter", "german_shorthaired", "great_pyrenees", "havanese",
    "japanese_chin", "keeshond", "leonberger", "Maine_Coon", "miniature_pinscher", "newfoundland",
    "Persian", "pomeranian", "pug", "Ragdoll", "Russian_Blue", "saint_bernard", "samoyed",
    "scottish_terrier", "shiba_inu", "Siamese", "Sphynx", "staffordshire_bull_terrier",
    "wheaten_terrier", "yorkshire_terrier",
]  # fmt: skip

# Other names people (and zero-shot BLIP) use for the breeds. Bare "bulldog" is left out:
# it names breeds outside the 37 and would credit a guess.
_ALIASES = {
    "american_pit_bull_terrier": ["pit bull", "pitbull", "pit bull terrier", "american pit bull",
                                  "american pitbull terrier"],
    "yorkshire_terrier": ["yorkie", "yorkshire"],
    "saint_bernard": ["st bernard", "st bernards"],
    "german_shorthaired": ["german shorthaired pointer", "german short haired pointer", "german shorthair",
                           "german short haired"],
    "staffordshire_bull_terrier": ["staffordshire", "staffy", "staffie", "stafford bull terrier",
                                   "staffordshire terrier"],
    "wheaten_terrier": ["wheaten", "soft coated wheaten terrier", "soft coated wheaten"],
    "scottish_terrier": ["scottie", "scotty", "scottie dog", "scotch terrier"],
    "shiba_inu": ["shiba", "shiba inus"],
    "english_cocker_spaniel": ["cocker spaniel", "cocker"],
    "great_pyrenees": ["pyrenees", "pyrenean mountain dog"],
    "newfoundland": ["newfie"],
    "miniature_pinscher": ["min pin", "minpin", "mini pinscher", "zwergpinscher"],
    "basset_hound": ["basset"],
    "british_shorthair": ["british blue", "british short hair"],
    "maine_coon": ["mainecoon", "maine coon cat"],
    "sphynx": ["sphinx cat", "sphynx cat", "hairless cat"],
    "ragdoll": ["rag doll"],
    "egyptian_mau": ["mau"],
    "japanese_chin": ["japanese spaniel"],
    "keeshond": ["keeshonden"],
}  # fmt: skip

CAT_WORDS = {"cat", "cats", "kitten", "kittens", "kitty", "kitties"}
DOG_WORDS = {"dog", "dogs", "puppy", "puppies", "pup", "pups", "doggy"}

OXFORD_PETS = LabelSet(
    names=[b.replace("_", " ").title() for b in BREEDS],  # "American Pit Bull Terrier"
    keys=BREEDS,
    aliases=[_ALIASES.get(b.lower(), []) for b in BREEDS],
    groups=["cat" if b[0].isupper() else "dog" for b in BREEDS],
    group_words={"cat": CAT_WORDS, "dog": DOG_WORDS},
    group_kind="species",
    kind="breed",
    alias_order=[[b.lower() for b in BREEDS].index(key) for key in _ALIASES],
)
# The names the pets code and tests use
BREED_NAMES = list(OXFORD_PETS.names)
SPECIES = list(OXFORD_PETS.groups)
NUM_BREEDS = len(OXFORD_PETS)
