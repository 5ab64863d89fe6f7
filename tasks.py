"""The tasks MVG learns, one entry each, and everything that differs between them.

Every module asks this registry what a task does instead of comparing task names, so adding a task
is one entry in TASKS (plus its tests). What an entry says:

    target                "label": the target holds class ids (drawn with a label encoding, decoded by
                          nearest colour, scored by overlap); "image": an 8-bit grey picture
    folders               the prepared folders of a case, {folder: kind}, input first, target second;
                          kind is image (8-bit grey), label (class ids) or mask (0 / 255). A layout may
                          rename the input and target folders (brats-synthesis names them by contrast)
    target_on_input_scale the target is normalised with the input's intensity parameters, so the pair
                          shares one scale and a prediction maps back to the input's units
    keep_slices           which slices prepare keeps for training: "foreground" (a label above
                          background) or "body" (enough of the input above black); `region_folder`, if
                          set, must also be non-empty (inpainting keeps slices with something to fill)
    always_autoregressive the mask policy: every sample hides the whole query target (segmentation),
                          else only with the run's --half_mask_ratio
    swap_prob             how often a training pair trades input and target (synthesis learns both ways)
    background_weight     loss weight of target pixels that are background (label targets), 1 elsewhere
    metrics               the summary scores of a dataset (evaluation/scoring.py); a task with a
                          region_folder is also scored inside the region (<metric>_region)
    baselines             what evaluation compares the model with (evaluation/baselines.py)
"""

from dataclasses import dataclass, field

from util.cli import UsageError

LABEL, IMAGE = "label", "image"


@dataclass(frozen=True)
class Task:
    name: str
    target: str
    folders: dict[str, str]
    help: str
    target_on_input_scale: bool = False
    keep_slices: str = "body"
    region_folder: str | None = None
    always_autoregressive: bool = False
    swap_prob: float = 0.0
    background_weight: float = 1.0
    metrics: tuple[str, ...] = ("psnr", "ssim")
    baselines: tuple[str, ...] = ("identity",)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def target_is_label(self) -> bool:
        return self.target == LABEL

    @property
    def input_folder(self) -> str:
        return next(iter(self.folders))

    @property
    def target_folder(self) -> str:
        return list(self.folders)[1]

    def folder_kinds(self, input_folder: str | None = None, target_folder: str | None = None) -> dict[str, str]:
        """{folder: kind}, with the input and target folders renamed where a layout names them."""
        renamed = {
            self.input_folder: input_folder or self.input_folder,
            self.target_folder: target_folder or self.target_folder,
        }
        return {renamed.get(folder, folder): kind for folder, kind in self.folders.items()}


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "segmentation",
            LABEL,
            {"image": "image", "label": "label"},
            help="image -> label map (class ids)",
            keep_slices="foreground",
            always_autoregressive=True,
            background_weight=0.1,
            metrics=("dice", "hd95"),
            baselines=("copy_context", "intensity"),
        ),
        Task(
            "synthesis",
            IMAGE,
            {"image": "image", "target": "image"},
            help="one MRI contrast -> another; each contrast on its own intensity scale",
            swap_prob=0.5,
        ),
        Task(
            "inpainting",
            IMAGE,
            {"image": "image", "target": "image", "mask": "mask"},
            help="image with a removed region -> the healthy image; scored also inside the region",
            target_on_input_scale=True,
            region_folder="mask",
        ),
        Task(
            "denoising",
            IMAGE,
            {"image": "image", "target": "image"},
            help="low-dose -> normal-dose image, on the input's intensity scale",
            target_on_input_scale=True,
        ),
    )
}
TASK_NAMES = tuple(TASKS)


def get_task(name: str, where: str = "task") -> Task:
    """The registry entry of `name`; an unknown name is a one-line UsageError naming `where`."""
    task = TASKS.get(name)
    if task is None:
        raise UsageError(f"{where}: unknown task {name!r}; expected one of {', '.join(TASK_NAMES)}")
    return task
