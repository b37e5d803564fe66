"""Our fast Felzenszwalb–Huttenlocher segmentation (numba), a drop-in for skimage's.

Felzenszwalb & Huttenlocher, "Efficient graph-based image segmentation", IJCV 2004, with
scikit-image's conventions (``skimage.segmentation.felzenszwalb``, the reference):

- the image (float64) is smoothed by a Gaussian of ``sigma`` (``mode="reflect"``, truncate 4);
- the graph is the 8-connected pixel grid, edges to the right, down, down-right and up-right
  neighbours, weight ``w = |I(p) - I(q)|`` (the Euclidean distance of the channel vectors
  for a multi-channel image, each channel smoothed alone);
- ``k = scale / 255`` (skimage's rescaling for float images);
- edges are visited by increasing weight; components A and B of an edge merge when
  ``w < min(Int(A) + k/|A|, Int(B) + k/|B|)``, ``Int`` being the weight of the last edge that
  merged into the component (the largest edge of its minimum spanning tree); thresholds are
  rounded to float32 as in skimage;
- then, visiting the edges in the same order, any edge touching a component smaller than
  ``min_size`` merges its two components.

What makes it fast: edges are ordered by a stable LSD radix sort on the high 32 bits of the
float64 weight (three 11-bit passes, the edge index carried along) followed by an insertion pass that restores exact float64
order (nearly sorted input, so linear time); union-find with path halving. Weights that tie
exactly keep their grid order (right, down, down-right, up-right), whereas skimage's
``np.argsort`` (introsort) orders ties arbitrarily: only exact ties of non-zero weight can
make the two differ. Zero-weight edges always merge, in any order, so they never matter.
"""

from __future__ import annotations

import numba
import numpy as np
from scipy import ndimage


def felzenszwalb_fast(image: np.ndarray, scale: float = 1.0, sigma: float = 0.8,
                      min_size: int = 20) -> np.ndarray:
    """Felzenszwalb segmentation of a single- or multi-channel image, same result as skimage's.

    image: (H, W) or (H, W, C) float array (any real dtype, channels last), H, W >= 1; each
        channel is smoothed alone, and an edge weighs the Euclidean distance of the pixels'
        C-vectors (skimage's ``felzenszwalb(image, channel_axis=-1)``).
    scale: observation level k*255 (higher = larger regions); > 0.
    sigma: Gaussian pre-smoothing std in pixels; >= 0.
    min_size: minimum region size in pixels, enforced in a post-processing pass.
    Returns (H, W) int64 labels 0..R-1, numbered in raster order of each region's first
    pixel (skimage's numbering).
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"felzenszwalb_fast needs an (H, W) or (H, W, C) image, got shape {image.shape}")
    if image.size == 0:
        raise ValueError(f"felzenszwalb_fast got an empty image of shape {image.shape}")
    if image.size >= 2**29:
        raise ValueError(f"felzenszwalb_fast: image of shape {image.shape} is too large (< 2**29 pixels)")
    if scale <= 0:
        raise ValueError(f"Illegal scale {scale}: must be > 0")
    if sigma < 0:
        raise ValueError(f"Illegal sigma {sigma}: must be >= 0")
    channels = image.reshape(*image.shape[:2], -1).astype(np.float64)
    smooth = ndimage.gaussian_filter(channels, sigma=(sigma, sigma, 0), mode="reflect",
                                     truncate=4.0)
    return _segment(np.ascontiguousarray(smooth), float(scale) / 255.0, int(min_size))


@numba.njit(cache=True)
def _edges(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-connected grid edges (a, b) and weights in skimage's order; img (H, W, C), weight
    ``sqrt(sum_c (I_c(a) - I_c(b))**2)`` (``|I(a) - I(b)|`` for one channel)."""
    h, w, _ = img.shape
    n = h * (w - 1) + (h - 1) * w + 2 * (h - 1) * (w - 1)
    a = np.empty(n, np.int32)
    b = np.empty(n, np.int32)
    cost = np.empty(n, np.float64)
    e = 0
    for i in range(h):  # right neighbour
        for j in range(w - 1):
            a[e] = i * w + j + 1
            b[e] = i * w + j
            cost[e] = _distance(img, i, j + 1, i, j)
            e += 1
    for i in range(h - 1):  # down neighbour
        for j in range(w):
            a[e] = (i + 1) * w + j
            b[e] = i * w + j
            cost[e] = _distance(img, i + 1, j, i, j)
            e += 1
    for i in range(h - 1):  # down-right neighbour
        for j in range(w - 1):
            a[e] = (i + 1) * w + j + 1
            b[e] = i * w + j
            cost[e] = _distance(img, i + 1, j + 1, i, j)
            e += 1
    for i in range(h - 1):  # up-right neighbour: (i, j+1) -- (i+1, j)
        for j in range(w - 1):
            a[e] = i * w + j + 1
            b[e] = (i + 1) * w + j
            cost[e] = _distance(img, i, j + 1, i + 1, j)
            e += 1
    return a, b, cost


@numba.njit(cache=True)
def _distance(img: np.ndarray, i0: int, j0: int, i1: int, j1: int) -> float:
    total = 0.0
    for c in range(img.shape[2]):
        d = img[i0, j0, c] - img[i1, j1, c]
        total += d * d
    return np.sqrt(total)


@numba.njit(cache=True)
def _stable_order(cost: np.ndarray) -> np.ndarray:
    """Indices sorting non-negative float64 ``cost`` ascending, ties in index order.

    Packs (high 32 bits of the weight, edge index) into one uint64 and LSD-radix-sorts it on
    the weight bits (three 11-bit digits; the sign bit is 0), carrying the index along, then
    an insertion pass fixes the order inside equal high words using the full float64.
    """
    n = cost.size
    bits = cost.view(np.uint64)
    packed = np.empty(n, np.uint64)
    for i in range(n):
        packed[i] = (bits[i] & np.uint64(0xFFFFFFFF00000000)) | np.uint64(i)
    tmp = np.empty(n, np.uint64)
    counts = np.empty(2049, np.int64)
    for shift in (32, 43, 54):
        sh = np.uint64(shift)
        counts[:] = 0
        for i in range(n):
            counts[((packed[i] >> sh) & np.uint64(0x7FF)) + 1] += 1
        if counts.max() == n:
            continue  # every key has the same digit: this pass would not move anything
        for d in range(2048):
            counts[d + 1] += counts[d]
        for i in range(n):
            d = (packed[i] >> sh) & np.uint64(0x7FF)
            tmp[counts[d]] = packed[i]
            counts[d] += 1
        packed, tmp = tmp, packed
    order = np.empty(n, np.int64)
    for i in range(n):
        order[i] = np.int64(packed[i] & np.uint64(0xFFFFFFFF))
    for i in range(1, n):
        cur = order[i]
        c = cost[cur]
        j = i - 1
        while j >= 0 and cost[order[j]] > c:
            order[j + 1] = order[j]
            j -= 1
        order[j + 1] = cur
    return order


@numba.njit(cache=True)
def _find(parent: np.ndarray, x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@numba.njit(cache=True)
def _segment(img: np.ndarray, k: float, min_size: int) -> np.ndarray:
    h, w, _ = img.shape
    n_pix = h * w
    a, b, cost = _edges(img)
    order = _stable_order(cost)
    a = a[order]
    b = b[order]
    cost = cost[order]
    n_edges = cost.size
    parent = np.arange(n_pix).astype(np.int32)
    size = np.ones(n_pix, np.int32)
    internal = np.zeros(n_pix, np.float64)
    for e in range(n_edges):
        ra = _find(parent, a[e])
        rb = _find(parent, b[e])
        if ra == rb:
            continue
        ta = np.float32(internal[ra] + k / size[ra])
        tb = np.float32(internal[rb] + k / size[rb])
        c = cost[e]
        if c < min(ta, tb):
            if size[ra] < size[rb]:
                ra, rb = rb, ra
            parent[rb] = ra
            size[ra] += size[rb]
            internal[ra] = c
    for e in range(n_edges):
        ra = _find(parent, a[e])
        rb = _find(parent, b[e])
        if ra == rb:
            continue
        if size[ra] < min_size or size[rb] < min_size:
            if size[ra] < size[rb]:
                ra, rb = rb, ra
            parent[rb] = ra
            size[ra] += size[rb]
    labels = np.empty(n_pix, np.int64)
    root_label = np.full(n_pix, -1, np.int64)
    next_label = 0
    for p in range(n_pix):
        r = _find(parent, p)
        if root_label[r] < 0:
            root_label[r] = next_label
            next_label += 1
        labels[p] = root_label[r]
    return labels.reshape(h, w)


def adjusted_rand_index(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985) of two labelings of the same pixels.

    labels_*: integer arrays of equal shape (any ids). With the contingency table n_ij,
    a_i = sum_j n_ij, b_j = sum_i n_ij, n pixels and C(x) = x(x-1)/2:
    ARI = (sum C(n_ij) - E) / ((sum C(a_i) + sum C(b_j)) / 2 - E), E = sum C(a_i) sum C(b_j) / C(n).
    1 = identical partitions; 1.0 is returned when both are a single cluster (or n < 2).
    """
    a = np.asarray(labels_a).ravel()
    b = np.asarray(labels_b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"labelings differ in size: {a.size} vs {b.size}")
    n = a.size
    if n < 2:
        return 1.0
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    pairs = np.unique(ai.astype(np.int64) * (int(bi.max()) + 1) + bi, return_counts=True)[1]

    def comb2(x: np.ndarray) -> float:
        x = x.astype(np.float64)
        return float((x * (x - 1) / 2).sum())

    sum_ij = comb2(pairs)
    sum_a = comb2(np.bincount(ai))
    sum_b = comb2(np.bincount(bi))
    expected = sum_a * sum_b / (n * (n - 1) / 2)
    top = (sum_a + sum_b) / 2
    if top == expected:
        return 1.0
    return (sum_ij - expected) / (top - expected)
