"""Synthetic chest CT phantoms with a heart label: the ct_heart bundle's embedded default and its test data.

Each phantom is a thorax drawn in patient (RAS) millimetres and sampled on a random voxel grid: body outline with
subcutaneous fat and chest wall muscle, lungs near -850 HU above a diaphragm dome, a heart (ventricles with blood
pool, septum and myocardium, an atrium, epicardial fat) rotated along its anatomical long axis, aorta, pulmonary
trunk and superior vena cava (blood, but *not* heart), the spine, ribs and sternum at bone HU, and correlated
noise. A third of the cases are non-contrast (blood about 40 HU, so the heart is delineated by fat and shape
only), the others contrast-enhanced. Size, position, orientation (rotation, voxel axis order and direction),
spacing and field of view vary per case, so a model cannot lean on one grid or one position.

Written as a Medical Segmentation Decathlon folder (``imagesTr``/``labelsTr``/``imagesTs``/``labelsTs`` NIfTI plus
``dataset.json``) and, for the test cases, also as DICOM CT series (``dicom/<case>/``) with correct geometry and
rescale tags, the form scanners deliver.

Run ``python -m clinseg.datasets.ct.phantom --out data/phantoms/ct_heart`` to write it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from clinseg.datasets.io import atomic_write, save_nifti

logger = logging.getLogger(__name__)

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
REGIONS = ("chest", "abdomen", "upper_abdomen")


@dataclass
class CTPhantom:
    """One synthetic case: HU volume and heart mask, both indexed ``[i, j, k]``, and the voxel-to-RAS affine."""

    hu: np.ndarray
    heart: np.ndarray
    affine: np.ndarray
    contrast: bool

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def heart_volume_ml(self) -> float:
        return float(self.heart.sum()) * float(np.prod(self.spacing)) / 1000.0


def _rotation(yaw: float, pitch: float, roll: float = 0.0) -> np.ndarray:
    """Rotation matrix for angles (radians) about z, then y, then x."""
    cz, sz, cy, sy, cx, sx = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


def _ellipsoid(x, y, z, centre, radii, rotation=None) -> np.ndarray:
    """Normalised radius ``sum((u / r) ** 2)`` of points in an (optionally rotated) ellipsoid's frame (< 1 inside)."""
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    if rotation is not None:  # local coordinates u = R^T (p - c)
        dx, dy, dz = (
            rotation[0, 0] * dx + rotation[1, 0] * dy + rotation[2, 0] * dz,
            rotation[0, 1] * dx + rotation[1, 1] * dy + rotation[2, 1] * dz,
            rotation[0, 2] * dx + rotation[1, 2] * dy + rotation[2, 2] * dz,
        )
    return (dx / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dz / radii[2]) ** 2


def _tube(x, y, z, points, radius: float) -> np.ndarray:
    """Voxels within ``radius`` of the polyline through ``points`` (mm)."""
    inside = np.zeros(x.shape, dtype=bool)
    for start, end in zip(points[:-1], points[1:], strict=True):
        start, end = np.asarray(start, np.float32), np.asarray(end, np.float32)
        direction = end - start
        length_sq = float(direction @ direction)
        t = ((x - start[0]) * direction[0] + (y - start[1]) * direction[1] + (z - start[2]) * direction[2]) / length_sq
        t = np.clip(t, 0.0, 1.0)
        distance_sq = (
            (x - start[0] - t * direction[0]) ** 2
            + (y - start[1] - t * direction[1]) ** 2
            + (z - start[2] - t * direction[2]) ** 2
        )
        inside |= distance_sq < radius**2
    return inside


def _random_grid(
    rng: np.random.Generator,
    centre: np.ndarray,
    voxel_scale: float = 1.0,
    slab_mm: float | None = None,
    slice_mm: float | None = None,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A random voxel grid (affine to RAS mm, shape) around ``centre``: spacing, field of view, axis directions and
    a small rotation all vary, as between scanners and reconstructions. ``voxel_scale`` > 1 coarsens the grid
    (tests use it for tiny volumes); ``slab_mm`` fixes the superior-inferior extent and ``slice_mm`` the slice
    spacing (5 mm, as many abdominal protocols reconstruct)."""
    spacing = np.array([rng.uniform(1.3, 2.0)] * 2 + [rng.uniform(1.5, 3.0)]) * voxel_scale
    field = np.array([rng.uniform(170, 340), rng.uniform(150, 270), rng.uniform(150, 210)])
    if slice_mm is not None:
        spacing[2] = slice_mm
    if slab_mm is not None:
        field[2] = slab_mm
    shape = np.maximum(np.round(field / spacing).astype(int), 8)
    # voxel axes: LPS-like (DICOM) or RAS-like storage, slices stacked upwards or downwards
    signs = np.array([rng.choice([-1.0, 1.0]), rng.choice([-1.0, 1.0]), rng.choice([-1.0, 1.0], p=[0.2, 0.8])])
    rotation = _rotation(
        np.deg2rad(rng.uniform(-12, 12)), np.deg2rad(rng.uniform(-4, 4)), np.deg2rad(rng.uniform(-4, 4))
    )
    linear = rotation @ np.diag(signs * spacing)
    centre_offset = centre + rng.uniform(-25, 25, size=3)
    origin = centre_offset - linear @ ((shape - 1) / 2.0)
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, origin
    return affine, tuple(int(s) for s in shape)


def _abdomen(rng, hu, x, y, z, below, texture, dome_z, wall_a, wall_b, spine_y, contrast: bool) -> None:
    """Organs under the diaphragm, bright enough with contrast to be confused with the heart by a careless model:
    liver, spleen, kidneys (cortex brighter than medulla), stomach (fluid, sometimes an air cap), bowel loops with
    air and fat, and the inferior vena cava."""
    enhance = 1.0 if contrast else 0.0
    organs = [  # centre (x, y, z offset from the dome), radii, HU plain, HU gain with contrast
        ((0.45 * wall_a, 0.0, -85), (0.5 * wall_a, 0.8 * wall_b, 95), 58, rng.uniform(40, 80)),  # liver
        ((-0.6 * wall_a, -0.4 * wall_b, -70), (35, 50, 55), 48, rng.uniform(50, 90)),  # spleen
    ]
    for centre, radii, plain, gain in organs:
        organ = below & (_ellipsoid(x, y, z, (centre[0], centre[1], dome_z + centre[2]), radii) < 1)
        hu[organ] = plain + enhance * gain + 0.15 * texture[organ]
    for side in (-1.0, 1.0):
        centre = (side * rng.uniform(45, 65), spine_y + 15, dome_z - rng.uniform(120, 150))
        kidney = _ellipsoid(x, y, z, centre, (28, 22, 55))
        hu[below & (kidney < 1)] = 35 + enhance * rng.uniform(120, 200)
        hu[below & (kidney < 0.35)] = 30 + enhance * rng.uniform(40, 90)
    stomach_centre = (-0.35 * wall_a, 0.3 * wall_b, dome_z - 45)
    stomach = below & (_ellipsoid(x, y, z, stomach_centre, (50, 40, 45)) < 1)
    hu[stomach] = 15 + 0.1 * texture[stomach]
    if rng.random() < 0.5:
        hu[stomach & (z > stomach_centre[2] + 20)] = -1000  # air above the fluid level
    for _ in range(int(rng.integers(20, 40))):
        centre = (rng.uniform(-0.7, 0.7) * wall_a, rng.uniform(-0.2, 0.8) * wall_b, dome_z - rng.uniform(90, 300))
        loop = below & (_ellipsoid(x, y, z, centre, rng.uniform(10, 24, size=3)) < 1)
        hu[loop] = -1000 if rng.random() < 0.2 else rng.uniform(-20, 60) + enhance * rng.uniform(0, 60)
    vena_cava = below & (np.hypot(x - 25, y - spine_y - 25) < rng.uniform(9, 13))
    hu[vena_cava] = 40 + enhance * rng.uniform(80, 180)


def synthesize_ct(
    seed: int | np.random.Generator = 0,
    contrast: bool | None = None,
    voxel_scale: float = 1.0,
    region: str | None = None,
    slab_mm: float | None = None,
    slice_mm: float | None = None,
    field_offset_mm: tuple[float, float, float] | None = None,
) -> CTPhantom:
    """Draw one CT phantom (HU, int-valued float32) with its binary heart mask.

    ``region`` is ``"chest"`` (field of view around the heart), ``"abdomen"`` (centred 15-26 cm lower: liver,
    spleen, kidneys, stomach and bowel, little or no heart) or ``"upper_abdomen"`` (centred 11-13 cm lower: the
    lung bases and the heart's inferior part at the top of an abdominal field); None draws chest or abdomen 3:1,
    so a model also learns what the heart is not. ``voxel_scale`` multiplies the voxel spacing (3 gives about
    40 x 35 x 25 voxels, for tests); ``slab_mm`` and ``slice_mm`` fix the field's superior-inferior extent and the
    slice spacing (a thin slab, 5 mm slices); ``field_offset_mm`` moves the field's centre (RAS mm) instead of the
    random offset, e.g. to cut the heart at the field's edge.
    """
    rng = np.random.default_rng(seed)
    if contrast is None:
        contrast = bool(rng.random() > 1 / 3)
    if region is None:
        region = "abdomen" if rng.random() < 0.25 else "chest"
    if region not in REGIONS:
        raise ValueError(f"region must be one of {', '.join(REGIONS)}, got {region!r}.")

    # --- anatomy parameters, RAS mm: +x = patient's right, +y = anterior, +z = superior
    body_a, body_b = rng.uniform(135, 175), rng.uniform(95, 125)  # body half-width (LR) and half-depth (AP)
    fat = rng.uniform(6, 25)
    muscle = rng.uniform(8, 16)
    heart_centre = np.array([rng.uniform(-35, -12), rng.uniform(0.05, 0.3) * body_b, rng.uniform(-15, 15)])
    heart_radii = np.array([rng.uniform(52, 68), rng.uniform(40, 52), rng.uniform(44, 58)])
    # long axis from the base (right, posterior, superior) to the apex (left, anterior, inferior)
    heart_rotation = _rotation(np.deg2rad(rng.uniform(-55, -25)), np.deg2rad(rng.uniform(15, 40)))
    myocardium = rng.uniform(7, 12)
    spine_y = -body_b + rng.uniform(38, 50)
    dome_z = heart_centre[2] - heart_radii[2] * rng.uniform(0.6, 0.9)

    # only the drawn region's offset consumes a random number, so the chest and abdomen phantoms stay as before
    below_heart_mm = 0.0
    if region == "abdomen":
        below_heart_mm = rng.uniform(150, 260)
    elif region == "upper_abdomen":
        below_heart_mm = rng.uniform(110, 130)
    field_centre = heart_centre - np.array([0.0, 0.0, below_heart_mm])
    affine, shape = _random_grid(rng, field_centre, voxel_scale, slab_mm, slice_mm)
    if field_offset_mm is not None:  # an exact centre instead of the random offset
        affine[:3, 3] = field_centre + np.asarray(field_offset_mm) - affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    a = affine.astype(np.float32)
    x = a[0, 0] * i + a[0, 1] * j + a[0, 2] * k + a[0, 3]
    y = a[1, 0] * i + a[1, 1] * j + a[1, 2] * k + a[1, 3]
    z = a[2, 0] * i + a[2, 1] * j + a[2, 2] * k + a[2, 3]
    del i, j, k

    # --- HU of each tissue
    blood_lv = rng.uniform(220, 450) if contrast else rng.uniform(30, 50)
    blood_rv = blood_lv * rng.uniform(0.55, 1.0) if contrast else blood_lv
    myo_hu = rng.uniform(90, 140) if contrast else rng.uniform(40, 55)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), 3.0) * 60
    hu = np.full(shape, -1000.0, dtype=np.float32)

    body_r = (x / body_a) ** 2 + (y / body_b) ** 2
    inner_a, inner_b = body_a - fat, body_b - fat
    wall_a, wall_b = inner_a - muscle, inner_b - muscle
    body = body_r < 1
    hu[body] = -100 + 0.2 * texture[body]  # subcutaneous fat
    muscle_mask = (x / inner_a) ** 2 + (y / inner_b) ** 2 < 1
    hu[muscle_mask] = 50 + 0.15 * texture[muscle_mask]
    cavity = (x / wall_a) ** 2 + (y / wall_b) ** 2 < 1
    hu[cavity] = -40 + texture[cavity]  # mediastinal fat and soft tissue

    # lungs above the diaphragm dome, beside the mediastinum
    dome = z > dome_z - ((x - 0.3 * body_a) ** 2 + y**2) / (2 * 140.0) - 10
    for side in (-1.0, 1.0):
        centre = (side * wall_a * 0.48, -0.05 * body_b, heart_centre[2] + 40)
        lung = (_ellipsoid(x, y, z, centre, (wall_a * 0.5, wall_b * 0.85, 150)) < 1) & cavity & dome
        lung &= np.abs(x - heart_centre[0] * 0.4) > rng.uniform(12, 22)
        hu[lung] = -850 + 0.4 * texture[lung]
    below = cavity & ~dome
    hu[below] = -70 + 0.5 * texture[below]  # abdominal fat, then the organs in it
    _abdomen(rng, hu, x, y, z, below, texture, dome_z, wall_a, wall_b, spine_y, contrast)

    # vessels leaving the heart: blood, but not heart
    top = heart_centre + heart_rotation @ np.array([0, 0, heart_radii[2] * 0.8])
    aorta_r = rng.uniform(11, 16)
    arch_z = top[2] + rng.uniform(35, 55)
    descending = (heart_centre[0] - 5, spine_y + 30, 0)
    aorta = [
        top,
        (top[0] + 5, top[1] + 5, arch_z - 10),
        (top[0] - 10, top[1] - 25, arch_z),
        (descending[0], descending[1], arch_z - 15),
        (descending[0], descending[1], dome_z - 320),
    ]
    vessels = _tube(x, y, z, aorta, aorta_r)
    trunk_start = heart_centre + heart_rotation @ np.array([0, heart_radii[1] * 0.5, heart_radii[2] * 0.6])
    trunk = [trunk_start, trunk_start + np.array([-15, -10, 35]), trunk_start + np.array([-45, -25, 45])]
    vessels |= _tube(x, y, z, trunk, rng.uniform(10, 14))
    vena_cava = [(top[0] + 25, top[1] - 5, top[2] - 10), (top[0] + 28, top[1] - 8, arch_z + 40)]
    vessels |= _tube(x, y, z, vena_cava, rng.uniform(8, 11))
    vessels &= cavity
    hu[vessels] = blood_lv + rng.normal(0, 8, int(vessels.sum()))

    # the heart: epicardial fat shell, ventricles (myocardium, septum, blood pools) and an atrium
    ventricles = _ellipsoid(x, y, z, heart_centre, heart_radii, heart_rotation)
    atrium_centre = heart_centre + heart_rotation @ np.array([8, -heart_radii[1] * 0.6, heart_radii[2] * 0.75])
    atrium_radii = heart_radii * np.array([0.55, 0.5, 0.45])
    atrium = _ellipsoid(x, y, z, atrium_centre, atrium_radii, heart_rotation)
    epicardial = (np.minimum(ventricles, atrium) < (1 + rng.uniform(2, 6) / heart_radii.min()) ** 2) & cavity
    hu[epicardial] = -90 + 0.2 * texture[epicardial]
    heart = ((ventricles < 1) | (atrium < 1)) & cavity
    hu[heart] = myo_hu + 0.1 * texture[heart]
    inner = heart_radii - myocardium
    pool = _ellipsoid(x, y, z, heart_centre, inner, heart_rotation) < 1
    # the septum: a myocardial wall across the ventricles, leaving the right ventricle on the anterior-right side
    septum_normal = heart_rotation @ np.array([np.cos(0.6), np.sin(0.6), 0.0])
    septum_offset = (x - heart_centre[0]) * septum_normal[0] + (y - heart_centre[1]) * septum_normal[1]
    septum_offset += (z - heart_centre[2]) * septum_normal[2]
    right_ventricle = pool & (septum_offset > myocardium * 0.6)
    left_ventricle = pool & (septum_offset < -myocardium * 0.6)
    hu[left_ventricle] = blood_lv
    hu[right_ventricle] = blood_rv
    atrium_pool = _ellipsoid(x, y, z, atrium_centre, atrium_radii - myocardium * 0.5, heart_rotation) < 1
    atrium_pool &= heart
    hu[atrium_pool] = blood_lv * rng.uniform(0.85, 1.0)

    # bone: spine (vertebral bodies with discs, posterior arch), ribs, sternum
    in_plane = np.sqrt(x**2 + (y - spine_y) ** 2)
    spine_r = rng.uniform(15, 20)
    vertebra = (in_plane < spine_r) & body
    hu[vertebra] = rng.uniform(180, 300)
    hu[vertebra & (in_plane > spine_r - 2.5)] = rng.uniform(700, 1000)
    disc_period, disc_phase = rng.uniform(24, 30), rng.uniform(0, 30)
    discs = vertebra & (np.mod(z + disc_phase, disc_period) < 6)
    hu[discs] = 90
    arch_r = np.sqrt(x**2 + (y - spine_y + spine_r + 10) ** 2)
    hu[(arch_r > 8) & (arch_r < 13) & (y < spine_y - spine_r + 6) & body] = 600
    rib_r = np.sqrt((x / (wall_a + 4)) ** 2 + (y / (wall_b + 4)) ** 2)
    rib_period, rib_phase = rng.uniform(20, 28), rng.uniform(0, 28)
    slanted_z = z + 0.35 * (y + body_b) + rib_phase
    ribs = (np.abs(rib_r - 1) < 5 / wall_b) & (np.mod(slanted_z, rib_period) < 8) & ~((y > 0) & (np.abs(x) < 25))
    hu[ribs & body] = rng.uniform(600, 900)
    sternum = (np.abs(x) < 14) & (y > wall_b - 4) & (y < wall_b + 10) & (z > dome_z)
    hu[sternum & body] = rng.uniform(350, 500)

    # scanner: point spread then correlated noise
    hu = ndimage.gaussian_filter(hu, 0.6)
    sigma = rng.uniform(8, 30)
    hu += ndimage.gaussian_filter(rng.normal(0, sigma * 1.8, shape).astype(np.float32), 0.7)
    hu = np.clip(np.round(hu), -1024, 3071).astype(np.float32)
    return CTPhantom(hu=hu, heart=heart.astype(np.uint8), affine=affine, contrast=contrast)


def write_msd_dataset(
    out_dir: str | os.PathLike,
    n_train: int = 16,
    n_test: int = 2,
    seed: int = 0,
    dicom: bool = True,
    progress: bool = True,
    voxel_scale: float = 1.0,
) -> Path:
    """Write phantoms as a Medical Segmentation Decathlon folder (and the test cases as DICOM series too).

    Cases are written one at a time, each file atomically, and ``dataset.json`` last: an interrupted run leaves
    only whole files and is simply rerun.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    for name in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out_dir / name).mkdir(parents=True, exist_ok=True)
    training, test, cases = [], [], []
    for index in tqdm(range(n_train + n_test), desc="CT phantoms", disable=not progress):
        case = f"ct_{index:03d}"
        split = "Tr" if index < n_train else "Ts"
        phantom = synthesize_ct(np.random.default_rng([seed, index]), voxel_scale=voxel_scale)
        save_nifti(out_dir / f"images{split}" / f"{case}.nii.gz", phantom.hu.astype(np.int16), phantom.affine)
        save_nifti(out_dir / f"labels{split}" / f"{case}.nii.gz", phantom.heart, phantom.affine)
        entry = {"image": f"./images{split}/{case}.nii.gz", "label": f"./labels{split}/{case}.nii.gz"}
        (training if split == "Tr" else test).append(entry)
        cases.append(
            {
                "id": case,
                "contrast": phantom.contrast,
                "shape": list(phantom.hu.shape),
                "spacing_mm": [round(s, 4) for s in phantom.spacing],
                "heart_volume_ml": round(phantom.heart_volume_ml, 2),
            }
        )
        if dicom and split == "Ts":
            from clinseg.datasets.ct.dicom import write_ct_series

            write_ct_series(
                phantom.hu,
                RAS_TO_LPS @ phantom.affine,
                out_dir / "dicom" / case,
                series_description=f"Synthetic chest CT phantom {case}",
                patient_id=f"PHANTOM-{case}",
            )
    description = {
        "name": "ct_heart_phantom",
        "description": "Synthetic chest CT phantoms with heart labels (generated by datasets.ct.phantom).",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "heart"},
        "numTraining": n_train,
        "numTest": n_test,
        "training": training,
        "test": [entry["image"] for entry in test],
        "cases": cases,
        "seed": seed,
    }
    atomic_write(out_dir / "dataset.json", lambda tmp: tmp.write_text(json.dumps(description, indent=2)))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/phantoms/ct_heart", help="output folder (MSD layout)")
    parser.add_argument("--n-train", type=int, default=16)
    parser.add_argument("--n-test", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--voxel-scale", type=float, default=1.0, help="multiply the voxel spacing (coarser, smaller)")
    parser.add_argument("--no-dicom", action="store_true", help="do not also write the test cases as DICOM series")
    args = parser.parse_args(argv)
    out = write_msd_dataset(
        args.out, args.n_train, args.n_test, args.seed, dicom=not args.no_dicom, voxel_scale=args.voxel_scale
    )
    print(f"wrote {args.n_train} training and {args.n_test} test phantoms to {out}")


if __name__ == "__main__":
    main()
