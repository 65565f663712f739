"""Synthetic 37-breed pets in the official layout, one process per breed (for gpu_recipe.sh).

python benchmarks/gen_pets.py OUT_DIR TRAINVAL_PER_BREED TEST_PER_BREED SIZE
"""

import os
import shutil
import sys
from multiprocessing import Pool

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from demo import write_synthetic_pets  # noqa: E402
from labels import NUM_BREEDS  # noqa: E402

root, tv, te, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])


def one(b):
    return write_synthetic_pets(
        f"{root}.parts/{b}", breeds=[b], trainval_per_breed=tv, test_per_breed=te, size=size, seed=b
    )


if __name__ == "__main__":
    with Pool(min(16, os.cpu_count())) as p:
        parts = p.map(one, range(NUM_BREEDS))
    os.makedirs(f"{root}/images", exist_ok=True)
    os.makedirs(f"{root}/annotations/trimaps", exist_ok=True)
    lists = {"list.txt": [], "trainval.txt": [], "test.txt": []}
    for part in parts:
        for f in os.listdir(f"{part}/images"):
            os.replace(f"{part}/images/{f}", f"{root}/images/{f}")
        for f in os.listdir(f"{part}/annotations/trimaps"):
            os.replace(f"{part}/annotations/trimaps/{f}", f"{root}/annotations/trimaps/{f}")
        for name in lists:
            lines = open(f"{part}/annotations/{name}").read().splitlines()
            lists[name] += [
                line
                for line in lines
                if line and (not line.startswith("#") or (name == "list.txt" and part == parts[0]))
            ]
    for name, lines in lists.items():
        hdr = [line for line in lines if line.startswith("#")]
        body = [line for line in lines if not line.startswith("#")]
        open(f"{root}/annotations/{name}", "w").write("\n".join(hdr + body) + "\n")
    shutil.rmtree(f"{root}.parts")
    print("pets:", len(lists["trainval.txt"]), "trainval,", len(lists["test.txt"]), "test, size", size)
