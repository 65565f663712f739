"""run_config.json, written and read from disk here only, and the record of what an adapter's training run was.

Every script writes run_config.json next to its outputs: the command line and the resolved options, one
section per options dataclass under a name that does not change when a class is renamed ("shared",
"train", "evaluate", "explain", "app", "sweep"). evaluate.py, explainability.py and app.py read the
adapter's record once, in parse_args (AdapterRun.read), fill in what the flags did not give, and pass it
down. Reading never locks, repairs or moves anything in the adapter folder. The section names and the parsing
of a file's contents (config.SECTIONS, config.run_config_from) stand with the options: given to a script as
its options file (config.options_file), a run_config.json re-runs its run.
"""

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass
from typing import Optional

from config import DEFAULT_DATASET, RunConfig, run_config_from
from labels import LabelSet
from model import check_adapter
from run_io import MOVING, UserError, same_source, write_json_atomic

logger = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"


def save_run_config(path: str, **sections) -> None:
    """Write the command line and each section (a dataclass of options, or a dict) to `path`."""
    record = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    for name, options in sections.items():
        if isinstance(options, dict):
            record[name] = options
        else:
            record[name] = options.to_dict() if hasattr(options, "to_dict") else asdict(options)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_json_atomic(path, record, indent=2)


def read_run_config(path: str) -> Optional[RunConfig]:
    """The run_config.json at `path` in either layout, or None when there is none; one warning when it is unreadable."""
    try:
        with open(path) as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("%s cannot be read (%s): the run's settings are unknown", path, e)
        return None
    return run_config_from(raw)


def _typed(options: dict, key: str, kind):
    """options[key] when it has type `kind` (bools are not numbers), else None."""
    value = options.get(key)
    if isinstance(value, bool) and kind is not bool:
        return None
    if kind is float and isinstance(value, int):
        return float(value)
    return value if isinstance(value, kind) else None


@dataclass
class AdapterRun:
    """What the adapter in `folder` was trained with: its checked adapter_config.json and what its run_config.json says.

    The run_config.json fields are None where the adapter has none (an adapter trained elsewhere).
    """

    folder: str
    adapter_config: dict  # model.check_adapter's: a complete adapter with finite weights
    dataset: Optional[str] = None
    val_fraction: Optional[float] = None
    seed: Optional[int] = None
    caption_template: Optional[str] = None
    embedding_cache_dir: Optional[str] = None  # None: train.py did not cache embeddings (or did not say where)
    embedding_cache_dtype: str = "float16"
    labels: Optional[LabelSet] = None  # the classes it names; None for adapters of runs that did not record them
    image_column_name: Optional[str] = None
    label_column_name: Optional[str] = None
    test_split: Optional[str] = None
    base_fingerprint: Optional[str] = None  # model.weights_fingerprint of the base it was trained on

    @property
    def base_model(self) -> str:
        return self.adapter_config["base_model_name_or_path"]

    @classmethod
    def read(cls, folder: str) -> "AdapterRun":
        """The adapter's record; one UserError line for a missing, broken or half-saved adapter."""
        if os.path.lexists(os.path.join(folder, MOVING)):
            raise UserError(
                f"adapter {folder!r} holds a save that was stopped while moving its files in ({MOVING}): its files "
                "may come from two runs. Train into that folder again (its next writer finishes or redoes the "
                "save), or pass another --adapter"
            )
        adapter_config = check_adapter(folder)
        run = read_run_config(os.path.join(folder, RUN_CONFIG))
        if run is None:
            return cls(folder, adapter_config)
        shared, train, trained_on = run.options("shared"), run.options("train"), run.options("trained_on")
        cache_on = _typed(train, "use_embedding_cache", bool) is not False
        dtype = _typed(train, "embedding_cache_dtype", str)
        labels = trained_on.get("labels")
        return cls(
            folder,
            adapter_config,
            dataset=_typed(shared, "dataset", str),
            val_fraction=_typed(shared, "val_fraction", float),
            seed=_typed(train, "seed", int),
            caption_template=_typed(shared, "caption_template", str),
            embedding_cache_dir=_typed(train, "embedding_cache_dir", str) if cache_on else None,
            embedding_cache_dtype=dtype if dtype in ("float16", "float32") else "float16",
            labels=None if labels is None else LabelSet.from_json(labels, os.path.join(folder, RUN_CONFIG)),
            image_column_name=_typed(shared, "image_column_name", str),
            label_column_name=_typed(shared, "label_column_name", str),
            test_split=_typed(shared, "test_split", str),
            base_fingerprint=_typed(trained_on, "base_fingerprint", str),
        )

    def use_sources_on_disk(self, cfg) -> None:
        """--demo: the base and data set this adapter was trained on, where not given and still on disk, so that
        the demo builds (and points at) only what neither the flags nor the adapter name."""
        if cfg.model_name_or_path is None and os.path.isdir(self.base_model):
            cfg.model_name_or_path = self.base_model
        if cfg.dataset is None and self.dataset is not None and os.path.isdir(self.dataset):
            cfg.dataset = self.dataset

    def fill(self, cfg) -> None:
        """The flags where given, else what the adapter was trained with: its base model, data set (else the
        default one), columns, held-out split and caption template."""
        if cfg.model_name_or_path is not None and not same_source(cfg.model_name_or_path, self.base_model):
            logger.warning(
                "adapter %s was trained on %r; using it on %r", self.folder, self.base_model, cfg.model_name_or_path
            )
        if cfg.label_names is not None and self.labels is not None:
            raise UserError(
                f"--label_names: adapter {self.folder!r} names its classes as its training run did; give "
                "--label_names to train.py"
            )
        cfg.model_name_or_path = cfg.model_name_or_path or self.base_model
        same_data = cfg.dataset is None or same_source(cfg.dataset, self.dataset)
        cfg.dataset = cfg.dataset or self.dataset or DEFAULT_DATASET
        if same_data:  # the columns and split names belong to the data set they were given for
            for name in ("image_column_name", "label_column_name", "test_split"):
                if getattr(cfg, name) is None:
                    setattr(cfg, name, getattr(self, name))
        cfg.caption_template = cfg.caption_template or self.caption_template

    def split_settings(self, cfg, split: str, seed: int) -> tuple:
        """(val_fraction, seed) that rebuild the adapter's own train/validation split.

        Another seed or fraction would draw another "validation" set, mostly training images. The test
        split depends on them only for a data set without a test split (then a seeded share is held out).
        """
        if self.val_fraction is None or self.seed is None:
            if split != "test":
                raise UserError(
                    f"--split {split} needs the adapter's run_config.json (its seed and val_fraction), which "
                    f"{self.folder!r} lacks or cannot be read; use --split test"
                )
            return cfg.val_fraction, seed
        if split != "test" and not same_source(self.dataset, cfg.dataset):
            logger.warning(
                "the adapter was trained on %r, not %r: --split %s is rebuilt on another data set than its own",
                self.dataset,
                cfg.dataset,
                split,
            )
        if (self.val_fraction, self.seed) != (cfg.val_fraction, seed):
            logger.info(
                "splitting the data as the adapter's training run did: val_fraction %g, seed %d",
                self.val_fraction,
                self.seed,
            )
        return self.val_fraction, self.seed
