"""The CT anatomy check's verdicts on phantoms built to trigger each of them, with the reference heart as the
prediction and with a heart-density false positive placed in the abdomen.

    python -m clinseg.pipelines.benchmarks.ct_anatomy_phantoms [--out bundles/ct_heart/outputs/anatomy_phantoms.json]

Each variant is a :func:`clinseg.datasets.ct.phantom.synthesize_ct` case (fixed seed) on its own grid; the checks
are the bundle's (``CTFieldOfViewd``, ``RemoveHeartOutsideAnatomyd``, ``CheckHeartAnatomyd``). Per variant:
the verdict, the reference heart's mL, what the check keeps of the reference (it must keep all of it), the flags
and what it removes of a 65 mL false positive placed 60 mm below the lung bases (or in the middle of a field
without lungs). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from clinseg.datasets.ct.phantom import synthesize_ct
from clinseg.pipelines.paths import SOURCE_ROOT
from clinseg.transforms.ct_anatomy import (
    CheckHeartAnatomyd,
    CTFieldOfViewd,
    FieldOfView,
    RemoveHeartOutsideAnatomyd,
    world_coordinates,
)

VARIANTS = {
    "chest": {"region": "chest"},
    "chest, 5 mm slices": {"region": "chest", "slice_mm": 5.0},
    "chest and abdomen, 340 mm": {"region": "chest", "slab_mm": 340.0, "field_offset_mm": (0.0, 0.0, -60.0)},
    "thin chest slab, 60 mm": {"region": "chest", "slab_mm": 60.0},
    "heart cut by the field": {"region": "chest", "field_offset_mm": (0.0, 0.0, 75.0)},
    "upper abdomen": {"region": "upper_abdomen"},
    "upper abdomen, 5 mm slices": {"region": "upper_abdomen", "slice_mm": 5.0},
    "abdomen": {"region": "abdomen"},
    "lower abdomen": {"region": "abdomen", "field_offset_mm": (0.0, 0.0, -60.0)},
    "lower abdomen, 5 mm slices": {"region": "abdomen", "field_offset_mm": (0.0, 0.0, -60.0), "slice_mm": 5.0},
}


def _meta(array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.as_tensor(array[None]), affine=torch.as_tensor(affine))


def _checked(phantom, prediction: np.ndarray, anatomy: str) -> tuple[np.ndarray, FieldOfView]:
    data = {"pred": _meta(prediction.astype(np.uint8), phantom.affine), "anatomy": anatomy}
    data = CheckHeartAnatomyd("pred")(RemoveHeartOutsideAnatomyd("pred")(data))
    return data["pred"][0].numpy() > 0, FieldOfView.from_json(data["anatomy"])


def false_positive(phantom, verdict: FieldOfView, radius_mm: float = 25.0) -> np.ndarray:
    """A ball of ``radius_mm`` 60 mm below the lung bases (or in the field's centre without lungs)."""
    centre = phantom.affine[:3, :3] @ ((np.array(phantom.hu.shape) - 1) / 2.0) + phantom.affine[:3, 3]
    if verdict.lung_base_z_mm is not None:
        centre[2] = verdict.lung_base_z_mm - 60.0
    distance_sq = sum((world_coordinates(phantom.affine, phantom.hu.shape, a) - centre[a]) ** 2 for a in range(3))
    return distance_sq < radius_mm**2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(SOURCE_ROOT / "bundles" / "ct_heart" / "outputs" / "anatomy_phantoms.json")
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    rows = {}
    for name, options in VARIANTS.items():
        phantom = synthesize_ct(args.seed, **options)
        anatomy = CTFieldOfViewd("image")({"image": _meta(phantom.hu, phantom.affine)})["anatomy"]
        verdict = FieldOfView.from_json(anatomy)
        voxel_ml = float(np.prod(phantom.spacing)) / 1000.0
        heart = phantom.heart > 0
        kept, on_heart = _checked(phantom, heart, anatomy)
        wrong = false_positive(phantom, verdict) & ~heart
        kept_wrong, on_wrong = _checked(phantom, heart | wrong, anatomy)
        rows[name] = {
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
            "shape": list(phantom.hu.shape),
            "spacing_mm": [round(s, 2) for s in phantom.spacing],
            "field_of_view": verdict.field_of_view,
            "heart_expected": on_heart.heart_expected,
            "reasons": on_heart.reasons,
            "reference_heart_ml": round(float(heart.sum()) * voxel_ml, 1),
            "reference_kept_ml": round(float((kept & heart).sum()) * voxel_ml, 1),
            "flags_on_reference": on_heart.flags,
            "volume_reportable": on_heart.volume_reportable,
            "false_positive_ml": round(float(wrong.sum()) * voxel_ml, 1),
            "false_positive_kept_ml": round(float((kept_wrong & wrong).sum()) * voxel_ml, 1),
            "flags_with_false_positive": on_wrong.flags,
        }
    print(f"{'variant':<28}{'field':>15}{'heart':>9}{'ref mL':>8}{'kept':>7}{'FP mL':>7}{'FP kept':>8}  flags")
    for name, row in rows.items():
        print(
            f"{name:<28}{row['field_of_view']:>15}{row['heart_expected']:>9}{row['reference_heart_ml']:>8.0f}"
            f"{row['reference_kept_ml']:>7.0f}{row['false_positive_ml']:>7.0f}{row['false_positive_kept_ml']:>8.0f}"
            f"  {', '.join(row['flags_on_reference']) or '-'} | {', '.join(row['flags_with_false_positive']) or '-'}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"seed": args.seed, "variants": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
