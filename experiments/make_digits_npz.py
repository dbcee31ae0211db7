"""Writes ``arjax/data/assets/digits.npz`` once from scikit-learn's bundled copy of the UCI
optdigits 8x8 digits (Alpaydin & Kaynak 1998, CC BY 4.0; see ``LICENSES/optdigits.txt``), so
that ``arjax`` reads the digits with numpy alone.

    pip install scikit-learn && python experiments/make_digits_npz.py

Stored: ``images`` uint8 ``[1797, 8, 8]`` (grey levels 0..16, as published) and ``target``
uint8 ``[1797]`` (the digit), in scikit-learn's order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parents[1] / "arjax" / "data" / "assets" / "digits.npz"


def main() -> None:
    digits = load_digits()
    images = digits.images.astype(np.uint8)  # [1797, 8, 8], integers 0..16 stored as float
    assert np.array_equal(images, digits.images) and images.max() == 16
    np.savez_compressed(OUT, images=images, target=digits.target.astype(np.uint8))
    print(f"{OUT}: {OUT.stat().st_size} bytes, images {images.shape}")


if __name__ == "__main__":
    main()
