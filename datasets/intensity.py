"""Intensity normalisation of whole volumes to [0, 1], later written as 8-bit grey.

    window      CT: clip to [low, high] Hounsfield units (default [-100, 200], the paper's window).
    percentile  MR: clip to the [0.5, 99.5] percentiles of the volume. Computed over the body by
                default, i.e. the voxels above the volume's minimum, so zero background (skull-stripped
                BraTS, padding) does not pull the low percentile down; --percentile_region volume
                uses every voxel instead.
    minmax      everything else (ultrasound, X-ray, ...): the volume's own [min, max].

NaN and infinite voxels (seen in some converted MR volumes) are replaced by the volume's smallest
finite value before any statistic is taken, i.e. they become background.
"""

from dataclasses import dataclass

import numpy as np

MR_MODALITIES = {"MRI", "MR"}


def default_method(modality):
    if modality.upper() == "CT":
        return "window"
    if modality.upper() in MR_MODALITIES:
        return "percentile"
    return "minmax"


@dataclass(frozen=True)
class IntensitySettings:
    """The flags of add_intensity_arguments with --normalization resolved; method None: not known
    (no --modality), which only a volume to normalise turns into an error."""

    method: str | None
    window: tuple[float, float] = (-100.0, 200.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    region: str = "body"

    @classmethod
    def from_args(cls, args, modality: str | None) -> "IntensitySettings":
        method = args.normalization
        if method == "auto":
            method = default_method(modality) if modality else None
        return cls(method, tuple(args.window), tuple(args.percentiles), args.percentile_region)

    def fit(self, volume) -> dict:
        return fit_parameters(volume, self.method, self.window, self.percentiles, self.region)


def replace_non_finite(volume):
    """Returns (float32 volume with NaN/inf replaced by its finite minimum, number replaced)."""
    volume = volume.astype(np.float32, copy=False)
    finite = np.isfinite(volume)
    count = int(volume.size - finite.sum())
    if count == 0:
        return volume, 0
    fill = float(volume[finite].min()) if finite.any() else 0.0
    return np.where(finite, volume, fill).astype(np.float32), count


def fit_parameters(volume, method, window=(-100.0, 200.0), percentiles=(0.5, 99.5), region="body"):
    """The [low, high] that maps to [0, 1], with the method's settings, as a JSON-ready dict."""
    if method == "window":
        low, high = window
        return {"method": "window", "low": float(low), "high": float(high)}
    if method == "percentile":
        values = volume
        if region == "body":
            body = volume[volume > volume.min()]
            values = body if body.size else volume
        low, high = np.percentile(values, percentiles)
        return {
            "method": "percentile",
            "percentiles": [float(p) for p in percentiles],
            "region": region,
            "low": float(low),
            "high": float(high),
        }
    if method == "minmax":
        return {"method": "minmax", "low": float(volume.min()), "high": float(volume.max())}
    raise ValueError(f"unknown intensity method '{method}'")


def normalise(volume, parameters):
    low, high = parameters["low"], parameters["high"]
    if high <= low:  # a constant volume: everything maps to black rather than dividing by zero
        return np.zeros_like(volume, dtype=np.float32)
    return np.clip((volume - low) / (high - low), 0.0, 1.0).astype(np.float32)


def to_uint8(picture):
    return np.round(np.clip(picture, 0.0, 1.0) * 255.0).astype(np.uint8)


def from_uint8_scale(values, parameters):
    """Values on the 0..255 scale of the written slices back to the volume's units (float32); what
    `normalise` clipped stays clipped."""
    low, high = parameters["low"], parameters["high"]
    return (low + values / 255.0 * (high - low)).astype(np.float32)


def add_intensity_arguments(group):
    """The intensity flags of data preparation; predict.py takes the same, so that a user's volume
    is scaled exactly as the training slices were."""
    group.add_argument(
        "--normalization",
        choices=["auto", "window", "percentile", "minmax"],
        default="auto",
        help="auto: window for CT, percentile for MRI, minmax otherwise",
    )
    group.add_argument(
        "--window", type=float, nargs=2, default=[-100.0, 200.0], metavar=("LOW", "HIGH"), help="CT window in HU"
    )
    group.add_argument(
        "--percentiles",
        type=float,
        nargs=2,
        default=[0.5, 99.5],
        metavar=("LOW", "HIGH"),
        help="MR percentiles mapped to black and white",
    )
    group.add_argument(
        "--percentile_region",
        choices=["body", "volume"],
        default="body",
        help="voxels the percentiles are taken over: above the volume minimum (body) or all",
    )
