r"""Sample quality without a pretrained network: sliced Wasserstein distance on image patches.

The sliced Wasserstein distance (*Rabin et al. (2011)*; used on Laplacian-pyramid patches by
*Karras et al. (2018), ProGAN, Sec. 5*) between two sets of vectors :math:`P, Q \subset
\mathbb R^d` averages the 1-D Wasserstein distance of their projections on random unit
directions :math:`\theta_k`:

.. math:: \mathrm{SWD}(P, Q) = \frac1K \sum_{k=1}^{K} W_1\big(\theta_k^\top P,\
          \theta_k^\top Q\big),\qquad W_1(p, q) = \frac1n \sum_{i=1}^{n} |p_{(i)} - q_{(i)}|

for equal-size sets (sorted projections). Here the vectors are 7x7x3 patches taken at the same
random positions from every image, each patch channel normalised by the pooled mean and std of
both sets (ProGAN's per-channel normalisation), so the number is scale free. Lower is better;
the number only means something next to references: the same figure for the training set
against the test set (a floor) and for blurred noise (a ceiling).
"""

from __future__ import annotations

import numpy as np


def random_patches(
    images: np.ndarray, patch: int, per_image: int, rng: np.random.Generator
) -> np.ndarray:
    """``per_image`` random ``patch x patch`` patches of each (N, H, W, C) image, flattened."""
    n, h, w, _ = images.shape
    ys = rng.integers(0, h - patch + 1, (n, per_image))
    xs = rng.integers(0, w - patch + 1, (n, per_image))
    rows = ys[..., None, None] + np.arange(patch)[:, None]
    cols = xs[..., None, None] + np.arange(patch)[None, :]
    idx = np.arange(n)[:, None, None, None]
    out = images[idx, rows, cols]  # (n, per_image, patch, patch, C)
    return out.reshape(n * per_image, -1).astype(np.float64)


def sliced_wasserstein(
    a: np.ndarray,
    b: np.ndarray,
    *,
    patch: int = 7,
    per_image: int = 16,
    directions: int = 512,
    seed: int = 0,
) -> float:
    """SWD between the 7x7 patches of image sets ``a`` and ``b`` (N, H, W, C), same N.

    Args:
        a, b: images (uint8 or float, any common scale), the same number of each.
        patch: patch side; per_image: patches drawn per image.
        directions: random projection directions K.
        seed: fixes the patch positions and the directions (so figures are comparable).
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 4 or a.shape[1:] != b.shape[1:] or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"a and b must be (N, H, W, C) of the same shape, got {a.shape}, {b.shape}"
        )
    # The same patch positions in both sets (so SWD(x, x) = 0 and SWD is symmetric).
    pa = random_patches(a.astype(np.float64), patch, per_image, np.random.default_rng(seed))
    pb = random_patches(b.astype(np.float64), patch, per_image, np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    c = a.shape[-1]
    both = np.concatenate([pa, pb]).reshape(-1, patch * patch, c)
    mean, std = both.mean(axis=(0, 1)), both.std(axis=(0, 1)) + 1e-12
    pa = ((pa.reshape(-1, patch * patch, c) - mean) / std).reshape(len(pa), -1)
    pb = ((pb.reshape(-1, patch * patch, c) - mean) / std).reshape(len(pb), -1)
    theta = rng.standard_normal((pa.shape[1], directions))
    theta /= np.linalg.norm(theta, axis=0, keepdims=True)
    proj_a = np.sort(pa @ theta, axis=0)
    proj_b = np.sort(pb @ theta, axis=0)
    return float(np.abs(proj_a - proj_b).mean())


def blurred_noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Uniform noise images blurred with a Gaussian of std ``sigma`` pixels (a "blob" baseline
    with image-like smoothness), uint8."""
    from scipy.ndimage import gaussian_filter

    noise = rng.uniform(0, 255, shape)
    blurred = gaussian_filter(noise, sigma=(0, sigma, sigma, 0), mode="wrap")
    lo, hi = blurred.min(axis=(1, 2, 3), keepdims=True), blurred.max(axis=(1, 2, 3), keepdims=True)
    return np.round((blurred - lo) / (hi - lo) * 255).astype(np.uint8)
