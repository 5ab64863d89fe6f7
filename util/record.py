"""What a checkpoint records about how its canvases were made, and how the entry points use it.

A model only works on canvases drawn the way it was trained: the same architecture and canvas size,
the same label encoding, slices prepared at the same size. main_pretrain.py stores a `CanvasRecord`
in every checkpoint (key 'canvas_record', a plain dict, loadable with weights_only=True).
main_eval.py, predict.py and main_pretrain.py --finetune take their settings from it:

    flag not given      the recorded value (else the entry point's default, where a safe one exists)
    flag given, equal   the flag
    flag contradicts    refused with a one-line error, unless --force

Checkpoints from elsewhere (the authors', Painter's, MAE's) hold no record. Our checkpoints written
before the record existed store their training arguments, which are read instead. Where neither
says a setting that has no safe default (the label encoding), the flag must be given.
"""

from dataclasses import asdict, dataclass, field, fields

from util.cli import UsageError

RECORD_KEY = "canvas_record"
RECORD_VERSION = 1
# The settings an entry point may take from a checkpoint, with their command-line flags.
SETTING_FLAGS = {
    "model": "--model",
    "input_size": "--input_size",
    "depth": "--depth",
    "label_encoding": "--label_encoding",
    "slice_size": "--slice_size",
}


@dataclass
class DatasetRecord:
    """One training dataset, as its manifest describes it."""

    task: str
    modality: str
    classes: dict[int, str] = field(default_factory=dict)  # segmentation: {id: name}, background included
    slice_size: list[int] = field(default_factory=list)  # prepared slices, [rows, cols]


@dataclass
class CanvasRecord:
    """How the training canvases of a checkpoint were made: what inference needs to draw its own."""

    model: str
    input_size: list[int]  # canvas [height, width]: two [height / 2, width] pairs stacked
    depth: int
    patch_size: int
    label_encoding: str
    slice_size: int | None  # side of the square prepared slices, when every dataset agrees
    datasets: dict[str, DatasetRecord]
    version: int = RECORD_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> "CanvasRecord":
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or not names <= set(raw):
            raise UsageError(f"{where}: its '{RECORD_KEY}' lacks {sorted(names - set(raw or {}))}")
        if raw["version"] != RECORD_VERSION:
            raise UsageError(
                f"{where}: '{RECORD_KEY}' version {raw['version']} is not supported (this code reads {RECORD_VERSION})"
            )
        datasets = {name: DatasetRecord(**entry) for name, entry in raw["datasets"].items()}
        return cls(**{**{k: raw[k] for k in names}, "datasets": datasets})

    def settings(self) -> dict:
        return {
            "model": self.model,
            "input_size": list(self.input_size),
            "depth": self.depth,
            "label_encoding": self.label_encoding,
            "slice_size": self.slice_size,
        }


def common_slice_size(datasets: dict[str, DatasetRecord]) -> int | None:
    """The side of the prepared slices when every dataset has square slices of one size, else None."""
    sizes = {tuple(d.slice_size) for d in datasets.values()}
    if len(sizes) == 1:
        ((rows, cols),) = sizes
        return rows if rows == cols else None
    return None


@dataclass
class RecordedSettings:
    """The settings a checkpoint states, and where they come from ('record', 'training arguments' or
    'nothing')."""

    values: dict
    source: str
    record: CanvasRecord | None = None


def recorded_settings(checkpoint: dict, where: str) -> RecordedSettings:
    """A checkpoint's own statement of its settings: its record; else our older checkpoints' training
    arguments (a dict); else, from the authors' argparse.Namespace, the model and canvas when they
    name an MVG model (MAE's name a model of their own, which says nothing about ours)."""
    if isinstance(checkpoint, dict) and RECORD_KEY in checkpoint:
        record = CanvasRecord.from_dict(checkpoint[RECORD_KEY], where)
        return RecordedSettings(record.settings(), "record", record)
    from models_mvg import MODELS  # here: the model zoo imports torch and timm
    from util.checkpoint import recorded_args

    args = recorded_args(checkpoint)
    values = dict.fromkeys(SETTING_FLAGS)
    if isinstance(checkpoint.get("args") if isinstance(checkpoint, dict) else None, dict):
        values.update({name: args.get(name) for name in ("model", "input_size", "depth", "label_encoding")})
        source = "training arguments"
    elif args.get("model") in MODELS:
        values.update(model=args["model"], input_size=args.get("input_size"))
        source = "training arguments"
    else:
        return RecordedSettings(values, "nothing")
    size = values["input_size"]  # MAE's is one int; only a (height, width) pair describes our canvas
    values["input_size"] = [int(v) for v in size] if isinstance(size, (list, tuple)) and len(size) == 2 else None
    return RecordedSettings(values, source)


def resolve_settings(
    flags: dict,
    recorded: RecordedSettings,
    where: str,
    force: bool = False,
    defaults: dict | None = None,
    required: tuple = (),
) -> dict:
    """The value of each setting in `flags` ({name: flag value or None}); see the module docstring.

    `defaults` fill what neither the flag nor the checkpoint says; a name in `required` without a
    value is an error that names its flag."""
    defaults = defaults or {}
    resolved = {}
    for name, given in flags.items():
        stated = recorded.values.get(name)
        if given is not None and name == "input_size":
            given = [int(v) for v in given]
        if given is not None and stated is not None and given != stated and not force:
            raise UsageError(
                f"{SETTING_FLAGS[name]} {_show(given)} contradicts {where}, whose "
                f"{recorded.source} says {_show(stated)}; drop the flag to use the "
                f"checkpoint's, or add --force"
            )
        value = given if given is not None else stated if stated is not None else defaults.get(name)
        if value is None and name in required:
            raise UsageError(
                f"{where} does not record its {name.replace('_', ' ')} (not trained by this "
                f"project): pass {SETTING_FLAGS[name]}"
            )
        resolved[name] = value
    return resolved


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
