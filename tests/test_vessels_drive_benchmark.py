"""The DRIVE benchmark's time to quality: the first validation reaching each F1 level, and its picture."""

from __future__ import annotations

from PIL import Image

from clinseg.pipelines.benchmarks.vessels_drive import draw_time_to_quality, time_to_quality

CURVE = [
    {"seconds": 12.0, "epoch": 2, "f1": 0.61},
    {"seconds": 25.5, "epoch": 4, "f1": 0.80},
    {"seconds": 38.0, "epoch": 6, "f1": 0.79},
    {"seconds": 51.2, "epoch": 8, "f1": 0.812},
]


def test_time_to_quality_is_the_first_validation_at_or_above_each_level():
    reached = time_to_quality(CURVE, levels=(0.6, 0.80, 0.81, 0.82))
    assert reached["0.600"] == {"seconds": 12.0, "epoch": 2}
    assert reached["0.800"] == {"seconds": 25.5, "epoch": 4}, "a level met exactly counts, the later dip does not"
    assert reached["0.810"] == {"seconds": 51.2, "epoch": 8}
    assert reached["0.820"] is None, "a level never reached is reported as such"
    assert time_to_quality([], levels=(0.8,)) == {"0.800": None}


def test_time_to_quality_picture_is_written(tmp_path):
    reached = time_to_quality(CURVE, levels=(0.80, 0.82))
    path = draw_time_to_quality(CURVE, reached, budget_s=60, path=tmp_path / "drive.png")
    with Image.open(path) as picture:
        assert picture.size[0] > 400 and picture.size[1] > 300
