"""The flags the entry points share, spelled, defaulted and explained once.

main_pretrain.py, main_eval.py and predict.py (and the benches) add these groups to their parsers, so
`--precision auto`, `--label_encoding` or `--num_prompts` mean the same everywhere. Settings a
checkpoint records (model, canvas, depth, label encoding) default to None here: the checkpoint's record
decides (util/record.py), a flag that contradicts it needs --force.
"""

from label_encoding import LABEL_ENCODINGS
from models_mvg import MODELS
from rel_pos_attention import ATTENTION_PATHS
from util.runtime import PRECISIONS, default_device

ENSEMBLES = ("features", "outputs", "both")
SCALES = ("training", "fit")


def add_model_flags(group, recorded_by: str = "the checkpoint"):
    """--model, --input_size, --depth, --label_encoding, --force; `recorded_by` names where their
    defaults come from."""
    group.add_argument(
        "--model", default=None, choices=sorted(MODELS), help=f"model factory (default: what {recorded_by} records)"
    )
    group.add_argument(
        "--input_size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help=f"canvas size, two H/2 x W pairs stacked (default: what {recorded_by} records, else the paper's 896 448)",
    )
    group.add_argument(
        "--depth",
        type=int,
        default=None,
        help=f"transformer blocks (default: what {recorded_by} records, else the model's)",
    )
    group.add_argument(
        "--label_encoding",
        default=None,
        choices=LABEL_ENCODINGS,
        help=f"how segmentation labels are drawn (default: what {recorded_by} records)",
    )
    group.add_argument(
        "--force",
        action="store_true",
        help=f"use the flags above even where they contradict what {recorded_by} records",
    )


def add_runtime_flags(group):
    """--device, --precision, --attention."""
    group.add_argument("--device", default=default_device(), help="cuda, cuda:N or cpu (default: cuda if available)")
    group.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="autocast precision; auto: bf16 on GPUs that have it, else fp16 on CUDA; on the CPU fp32 for "
        "training, and for inference bf16 where the CPU has bf16 instructions, else fp32 (util/runtime.py)",
    )
    group.add_argument(
        "--attention",
        default="auto",
        choices=ATTENTION_PATHS,
        help="how attention adds the relative-position bias (all exact); auto: the fastest "
        "measured path for the device, dtype, grad mode and token count (rel_pos_attention.choose_attention)",
    )


def add_prompt_flags(group):
    """--num_prompts, --ensemble, --scale: how a query meets its context pairs at inference."""
    group.add_argument("--num_prompts", type=int, default=1, help="context pairs per query")
    group.add_argument(
        "--ensemble",
        default="features",
        choices=ENSEMBLES,
        help="how several prompts are combined: averaged features, outputs, or both",
    )
    group.add_argument(
        "--scale",
        default="training",
        choices=SCALES,
        help="training: overlapping windows at the training crops' scale; fit: the whole "
        "slice resized to the canvas half (inference.py)",
    )
