"""Pre-train a demo base and score its zero-shot species on the demo test set (issue 22's table).

    python benchmarks/demo_species.py OUT_DIR [--seed 0] [--recipe '{"steps": 500, "batch": 16}']

Prints one JSON line: pre-training wall and CPU seconds, species accuracy, share of captions naming
no breed, species accuracy per breed. The demo pets are drawn into OUT_DIR/pets.
"""

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import demo  # noqa: E402
from config import PetConfig  # noqa: E402
from data import SPECIES, UNKNOWN, breed_from_caption, load_image, load_splits, species_from_caption  # noqa: E402
from model import generate_caption, load_base_model, load_processor  # noqa: E402


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe", default="{}", help="JSON overrides of demo.DEMO_BASE_RECIPE")
    args = parser.parse_args()
    template = PetConfig().caption_template
    recipe = {**demo.DEMO_BASE_RECIPE, "seed": args.seed, **json.loads(args.recipe)}
    pets, base = demo.prepare_demo_data(args.out_dir), os.path.join(args.out_dir, "base")
    os.makedirs(base, exist_ok=True)
    wall, cpu = time.time(), cpu_seconds()
    demo.pretrain_demo_blip(base, template, recipe, show_progress=False)
    wall, cpu = time.time() - wall, cpu_seconds() - cpu
    model, processor = load_base_model(base).eval(), load_processor(base)
    test = load_splits(pets)["test"]
    captions = generate_caption(model, processor, [load_image(r) for r in test], max_new_tokens=16)
    right = [species_from_caption(c) == SPECIES[r.label] for c, r in zip(captions, test)]
    per_breed = {}
    for ok, r in zip(right, test):
        per_breed.setdefault(r.label, []).append(ok)
    print(json.dumps({"recipe": recipe, "pretrain_wall_s": round(wall, 1), "pretrain_cpu_s": round(cpu, 1),
                      "species_accuracy": sum(right) / len(test),
                      "no_breed_rate": sum(breed_from_caption(c) == UNKNOWN for c in captions) / len(test),
                      "species_per_breed": {k: sum(v) / len(v) for k, v in sorted(per_breed.items())}}))


if __name__ == "__main__":
    main()
