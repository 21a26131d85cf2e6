"""Benchmarks: they print numbers and write JSON; they assert nothing (targets are checked by reading them)."""

import json
import os
from pathlib import Path

from clinseg.pipelines.paths import SOURCE_ROOT


def shared_data_dir() -> Path:
    """The real public data: ``$SHARED_DATA_DIR``, else ``shared/data`` beside the project."""
    return Path(os.environ.get("SHARED_DATA_DIR", SOURCE_ROOT.parent / "shared" / "data"))


def drive_training_dir() -> str:
    """DRIVE's released training folder: ``$DRIVE_DIR``, else in the shared real data."""
    return os.environ.get("DRIVE_DIR", str(shared_data_dir() / "vessels" / "DRIVE" / "training"))


def write_report(path: str | Path, report: dict) -> Path:
    """Write a benchmark's ``report`` as JSON at ``path`` (its folder made if needed) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def save_panels(panels: list, titles: list[str], width: int, path: str | Path) -> Path:
    """Save PIL images side by side at ``path``, each resized to ``width`` (the first one's aspect) under its title:
    the captioned picture a benchmark writes beside its JSON."""
    from PIL import Image, ImageDraw

    height = round(width * panels[0].height / panels[0].width)
    canvas = Image.new("RGB", (width * len(panels), height + 24), "white")
    pen = ImageDraw.Draw(canvas)
    for index, (panel, title) in enumerate(zip(panels, titles, strict=True)):
        canvas.paste(panel.resize((width, height), Image.Resampling.NEAREST), (index * width, 24))
        pen.text((index * width + 4, 6), title, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
