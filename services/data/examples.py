"""scikit-learn's bundled datasets written under a data root, for the bundled example configs
(examples/datasets/*.yaml). No network: the data ships inside scikit-learn.

    python -m aimass.data.examples [DATA_ROOT]    # default: ~/.aimass/data or $AIMASS_HOME/data
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def write_digits_csv(root: Path) -> Path:
    """digits.csv: 64 pixel columns p0..p63 (0-16) and the label column ``digit``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = root / "digits.csv"
    header = ",".join([f"p{i}" for i in range(64)] + ["digit"])
    rows = np.column_stack([digits.data.astype(np.int64), digits.target])
    np.savetxt(path, rows, fmt="%d", delimiter=",", header=header, comments="")
    return path


def write_digits_images(root: Path) -> Path:
    """digits_images/<digit>/<n>.png: 8x8 grayscale images, one folder per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = root / "digits_images"
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        target = folder / str(label) / f"{index:04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8), mode="L").save(target)
    return folder


def write_breast_cancer_csv(root: Path) -> Path:
    """breast_cancer.csv: 30 float features and the 0/1 label ``target``."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    names = [str(n).replace(" ", "_") for n in bunch.feature_names] + ["target"]
    path = root / "breast_cancer.csv"
    with path.open("w") as handle:
        handle.write(",".join(names) + "\n")
        for features, target in zip(bunch.data, bunch.target, strict=True):
            handle.write(",".join(repr(float(v)) for v in features) + f",{int(target)}\n")
    return path


def materialise(root: Path) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    return [write_digits_csv(root), write_digits_images(root), write_breast_cancer_csv(root)]


def main() -> None:
    from aimass.core.settings import load_settings

    root = Path(sys.argv[1]) if len(sys.argv) > 1 else load_settings().data_roots[0]
    for path in materialise(root):
        print(path)


if __name__ == "__main__":
    main()
