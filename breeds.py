"""The 37 breeds: names, species, the caption wording, and reading a breed or species back out of a caption."""

import re
from typing import Any, Optional

import numpy as np

# The 37 breeds in the official class-id order (class id = index + 1). Cat breeds
# are capitalised in the official file names, dogs are not.
BREEDS = [
    "Abyssinian",
    "american_bulldog",
    "american_pit_bull_terrier",
    "basset_hound",
    "beagle",
    "Bengal",
    "Birman",
    "Bombay",
    "boxer",
    "British_Shorthair",
    "chihuahua",
    "Egyptian_Mau",
    "english_cocker_spaniel",
    "english_setter",
    "german_shorthaired",
    "great_pyrenees",
    "havanese",
    "japanese_chin",
    "keeshond",
    "leonberger",
    "Maine_Coon",
    "miniature_pinscher",
    "newfoundland",
    "Persian",
    "pomeranian",
    "pug",
    "Ragdoll",
    "Russian_Blue",
    "saint_bernard",
    "samoyed",
    "scottish_terrier",
    "shiba_inu",
    "Siamese",
    "Sphynx",
    "staffordshire_bull_terrier",
    "wheaten_terrier",
    "yorkshire_terrier",
]
BREED_NAMES = [b.replace("_", " ").title() for b in BREEDS]  # "American Pit Bull Terrier"
SPECIES = ["cat" if b[0].isupper() else "dog" for b in BREEDS]
NUM_BREEDS = len(BREEDS)
_BREED_INDEX = {}
for _i, _b in enumerate(BREEDS):
    for _key in (_b, _b.lower(), BREED_NAMES[_i].lower(), _b.lower().replace("_", "")):
        _BREED_INDEX[_key] = _i


def breed_index(label: Any) -> int:
    """Class index 0-36 from an int or any spelling of a breed name; ValueError if unknown."""
    if isinstance(label, (int, np.integer)):
        if 0 <= int(label) < NUM_BREEDS:
            return int(label)
        raise ValueError(f"breed index {label} is outside 0-{NUM_BREEDS - 1}")
    key = str(label).strip().lower().replace("-", "_").replace(" ", "_")
    for candidate in (key, key.replace("_", "")):
        if candidate in _BREED_INDEX:
            return _BREED_INDEX[candidate]
    raise ValueError(f"unknown breed {label!r}")


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def caption_for(label: int, template: str) -> str:
    name = BREED_NAMES[label]
    return template.format(breed=name, article=article(name))


# ---------------------------------------------------------------------------
# Breed and species named in a caption

UNKNOWN = -1  # the caption names no breed

# Other names people (and zero-shot BLIP) use for the breeds. Bare "bulldog" is left out:
# it names breeds outside the 37 and would credit a guess.
_ALIASES = {
    "american_pit_bull_terrier": [
        "pit bull",
        "pitbull",
        "pit bull terrier",
        "american pit bull",
        "american pitbull terrier",
    ],
    "yorkshire_terrier": ["yorkie", "yorkshire"],
    "saint_bernard": ["st bernard", "st bernards"],
    "german_shorthaired": [
        "german shorthaired pointer",
        "german short haired pointer",
        "german shorthair",
        "german short haired",
    ],
    "staffordshire_bull_terrier": [
        "staffordshire",
        "staffy",
        "staffie",
        "stafford bull terrier",
        "staffordshire terrier",
    ],
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
}


def normalise_text(text: str) -> str:
    text = text.lower().replace("st.", "st ").replace("-", " ")
    return " " + " ".join(re.sub(r"[^a-z0-9 ]", " ", text).split()) + " "


BREED_PHRASES = sorted(
    [(normalise_text(BREED_NAMES[i]).strip(), i) for i in range(NUM_BREEDS)]
    + [(normalise_text(a).strip(), breed_index(b)) for b, names in _ALIASES.items() for a in names],
    key=lambda p: -len(p[0]),
)


def breed_from_caption(caption: str) -> int:
    """Index of the breed a caption names, UNKNOWN if none; the longest matching name wins.

    Matching is on normalised whole words (plural 's' allowed), so "pit bull" does not beat
    "American Pit Bull Terrier", and "pug" does not match inside "pugnacious".
    """
    text = normalise_text(caption)
    for phrase, label in BREED_PHRASES:  # longest first
        if f" {phrase} " in text or f" {phrase}s " in text or f" {phrase}es " in text:
            return label
    return UNKNOWN


CAT_WORDS = {"cat", "cats", "kitten", "kittens", "kitty", "kitties"}
DOG_WORDS = {"dog", "dogs", "puppy", "puppies", "pup", "pups", "doggy"}


def species_from_caption(caption: str) -> Optional[str]:
    """ "cat" or "dog": from the breed a caption names, else from words like cat/kitten/dog/puppy; None if unclear."""
    label = breed_from_caption(caption)
    if label != UNKNOWN:
        return SPECIES[label]
    words = set(normalise_text(caption).split())
    cat, dog = bool(words & CAT_WORDS), bool(words & DOG_WORDS)
    return "cat" if cat and not dog else "dog" if dog and not cat else None
