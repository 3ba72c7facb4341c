"""Near-copy groups: a perceptual signature per usable image, and groups of verified near copies.

The signature is a SIDE x SIDE grayscale thumbnail, taken from the pixels `inspect_image` decodes anyway
(no second decode). Grouping works in three steps, so that images that are alike but distinct (the same
letter in two similar fonts, a burst of photos of one scene) do not chain a class into one big group:
1. propose: each image is paired with its `neighbours` nearest others (`method` moments: by the correlation
   of moment-normalised 8x8 views, see `canonical`, which line a copy up with its original whatever the
   crop; or phash, dhash, ahash: by perceptual-hash distance, within `hash_distance` bits);
2. verify: a proposed pair is a copy when the Pearson correlation of the thumbnails, after aligning one to
   the other over small crops (each side up to `MAX_CROP` of the image) and shifts, reaches
   `min_similarity`, and reaches what the sharper of the two keeps of itself in a simulated copy
   (`self_similarity`). Correlation ignores brightness and contrast; the alignment absorbs resizing and
   crops of a few pixels; the thumbnail's averaging absorbs JPEG re-encoding. The second bar adapts to the
   image: a smooth photo keeps about 0.98-0.99 of itself in a copy, so two frames of a burst, which differ
   by moved subjects, fall below it; a sharp-edged image (a letter) loses more to a copy, and
   `min_similarity` decides (two renders of a letter in near-identical fonts then pass: their pixels differ
   less than a copy's do from its original);
3. group: verified pairs join their images' groups, best pair first, unless the group would exceed
   `max_group_size` images. Each member is a verified copy of another member, and a group never grows
   past the bound: alike-but-distinct images can link a few images, never a whole class. (Requiring every
   pair in a group to be verified, complete linkage, left a fifth of the true copies on a letters-in-fonts
   set ungrouped: a copy's original often joins a near-identical font's render first.)
Besides the groups, each image's best match: the image it is most alike among those it was aligned with,
when that similarity is within LIKELY x what a verified pair may lack (1 - the similarity needed) and both
are at least SIDE pixels on their shorter side (smaller ones correlate highly by chance). Where
no group could take a copy (its similarity just below the bar, or both groups full) its best match is
often its original; the split keeps the two in one split (see splits.py). Best matches are no near copies:
the label-conflict rule does not use them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image

SIDE = 32  # pixels of the thumbnail: 1 KB per image, held in memory by validate
MAX_CROP = 0.12  # fraction of a side that an aligned crop may remove
CROP_STEPS = 4  # crop fractions tried per axis on the grid: 0, 0.04, 0.08, 0.12 (refinement does the rest)
SIEVE = 0.1  # a pair whose views (see near_copy_groups) correlate this far below min_similarity is not aligned
PROPOSE_BELOW = 0.25  # a pair whose 8x8 views correlate this far below min_similarity is never proposed
REFINE_WITHIN = 0.04  # a grid score this close to the similarity needed is refined (see Verifier)
CANONICAL_SIDE = 8  # pixels of the moment-normalised view that proposes pairs
CANONICAL_SPREAD = 0.22  # the contrast's standard deviation, as a fraction of that view's side
COPY_SCALE, COPY_SHIFT = 0.75, 0.6  # the copy that self_similarity simulates: 3/4 of the size, shifted 0.6 px
BORDER = 2  # pixels of the thumbnail left out of the correlation (what crops move in and out)
LIKELY = 3.0  # a best match lacks at most this many times what a verified copy may lack of a correlation of 1


def thumbnail(image: Image.Image) -> bytes:
    """The signature of a decoded RGB or L image: SIDE x SIDE grayscale bytes (box-filtered: every source
    pixel counts, so re-encoding noise averages out)."""
    return image.convert("L").resize((SIDE, SIDE), Image.Resampling.BOX, reducing_gap=2.0).tobytes()


def as_array(signatures: list[bytes]) -> np.ndarray:
    """float32 (n, SIDE, SIDE) thumbnails from `thumbnail`'s bytes."""
    flat = np.frombuffer(b"".join(signatures), dtype=np.uint8) if signatures else np.zeros(0, np.uint8)
    return flat.reshape(len(signatures), SIDE, SIDE).astype(np.float32)


def hash_bits(thumbs: np.ndarray, method: str) -> np.ndarray:
    """64-bit perceptual hashes (bool (n, 64)) of thumbnails, as imagehash computes them."""
    if method == "phash":
        from scipy.fft import dctn

        low = dctn(thumbs, axes=(1, 2), norm="ortho")[:, :8, :8].reshape(len(thumbs), 64)
        return low > np.median(low, axis=1, keepdims=True)
    if method == "dhash":
        small = np.stack([np.asarray(Image.fromarray(t).resize((9, 8), Image.Resampling.BOX)) for t in thumbs])
        return (small[:, :, 1:] > small[:, :, :-1]).reshape(len(thumbs), 64)
    if method == "ahash":
        small = thumbs.reshape(len(thumbs), 8, SIDE // 8, 8, SIDE // 8).mean(axis=(2, 4)).reshape(len(thumbs), 64)
        return small > small.mean(axis=1, keepdims=True)
    raise ValueError(f"unknown signature method {method!r}")


def candidate_pairs(bits: np.ndarray, max_distance: int, neighbours: int, block: int = 1024) -> list[tuple[int, int]]:
    """Pairs (i < j) where j is among i's `neighbours` nearest hashes (or i among j's) within max_distance bits."""
    packed = np.packbits(bits, axis=1).view(">u8").ravel()
    pairs = set()
    for start in range(0, len(packed), block):
        rows = packed[start : start + block]
        distance = np.bitwise_count(rows[:, None] ^ packed[None, :]).astype(np.int16)
        distance[np.arange(len(rows)), np.arange(start, start + len(rows))] = 99  # not itself
        keep = min(neighbours, len(packed) - 1)
        if keep < 1:
            break
        nearest = np.argpartition(distance, keep - 1, axis=1)[:, :keep]
        for offset, (row, cols) in enumerate(zip(distance, nearest)):
            for j in cols[row[cols] <= max_distance]:
                i = start + offset
                pairs.add((min(i, int(j)), max(i, int(j))))
    return sorted(pairs)


def canonical(thumbs: np.ndarray, sides: tuple[int, ...] = (CANONICAL_SIDE,)) -> list[np.ndarray]:
    """Moment-normalised low-resolution views: each thumbnail resampled so that the centroid of its contrast
    (the absolute difference from its median) is in the middle and its spread along each axis is fixed.
    A crop of a few pixels or a resize barely moves these moments, so a copy's view matches its original's
    where the plain thumbnails do not line up. One view per side in `sides`: centred, unit-length
    float32 (n, side * side)."""
    flat, middle = thumbs.reshape(len(thumbs), -1), SIDE * SIDE // 2
    median = np.partition(flat, (middle - 1, middle), axis=1)[:, middle - 1 : middle + 1].mean(axis=1)
    contrast = np.abs(thumbs - median[:, None, None])  # (np.median over two axes copies: 8x slower)
    weights = contrast / np.maximum(contrast.sum(axis=(1, 2), keepdims=True), 1e-6)
    centre = np.arange(SIDE, dtype=np.float32) + 0.5
    cy, cx = (weights.sum(axis=2) * centre).sum(axis=1), (weights.sum(axis=1) * centre).sum(axis=1)
    sy = np.sqrt((weights.sum(axis=2) * (centre[None, :] - cy[:, None]) ** 2).sum(axis=1))
    sx = np.sqrt((weights.sum(axis=1) * (centre[None, :] - cx[:, None]) ** 2).sum(axis=1))
    half_w, half_h = np.maximum(sx, 0.5) / CANONICAL_SPREAD / 2, np.maximum(sy, 0.5) / CANONICAL_SPREAD / 2
    views = []
    for side in sides:
        rows, columns = _weights(cy - half_h, cy + half_h, side), _weights(cx - half_w, cx + half_w, side)
        view = (rows @ thumbs @ columns.transpose(0, 2, 1)).reshape(len(thumbs), -1)
        view = view - view.mean(axis=1, keepdims=True)
        views.append(view / np.maximum(np.linalg.norm(view, axis=1, keepdims=True), 1e-3))
    return views


def nearest_pairs(views: np.ndarray, neighbours: int, floor: float = -1.0, block: int = 1024) -> np.ndarray:
    """Pairs (i < j), int (m, 2) sorted, where j is among the `neighbours` views most correlated with i's (or i
    among j's) and the correlation reaches `floor`. Blocks of rows run on threads (numpy releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from stages.lib.core.parallel import available_cores

    keep = min(neighbours, len(views) - 1)

    def pairs_of(start: int) -> np.ndarray:
        scores = views[start : start + block] @ views.T
        scores[np.arange(len(scores)), np.arange(start, start + len(scores))] = -np.inf  # not itself
        above = scores >= floor
        crowded = np.count_nonzero(above, axis=1) > keep  # rows with more candidates: only their nearest count
        above[crowded] = False
        rows, cols = np.divmod(np.flatnonzero(above), scores.shape[1])  # (2-D nonzero is 20x slower)
        if crowded.any():
            nearest = _top(scores[crowded], keep).ravel()
            more_rows = np.repeat(np.flatnonzero(crowded), keep)
            close = scores[more_rows, nearest] >= floor
            rows, cols = np.concatenate([rows, more_rows[close]]), np.concatenate([cols, nearest[close]])
        rows = rows + start
        return np.stack([np.minimum(rows, cols), np.maximum(rows, cols)], axis=1)

    with ThreadPoolExecutor(min(available_cores(), -(-len(views) // block))) as pool:
        found = list(pool.map(pairs_of, range(0, len(views), block)))
    return np.unique(np.concatenate(found), axis=0) if found else np.zeros((0, 2), int)


def _top(scores: np.ndarray, keep: int, chunk: int = 64) -> np.ndarray:
    """The columns of each row's `keep` largest scores (unordered), as np.argpartition would find them, but
    searching only the `keep` chunks of columns with the largest maxima: the k largest values of a row lie in
    those (each chunk holding one has its maximum among them), and a full partition of every row would cost
    more than the products that gave the scores."""
    rows, columns = scores.shape
    if columns <= 4 * chunk * keep:
        return np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
    padded = np.full((rows, -(-columns // chunk) * chunk), -np.inf, scores.dtype)
    padded[:, :columns] = scores
    chunks = np.argpartition(-padded.reshape(rows, -1, chunk).max(axis=2), keep - 1, axis=1)[:, :keep]
    candidates = (chunks[:, :, None] * chunk + np.arange(chunk)).reshape(rows, -1)
    best = np.argpartition(-np.take_along_axis(padded, candidates, axis=1), keep - 1, axis=1)[:, :keep]
    return np.take_along_axis(candidates, best, axis=1)


def _boxes() -> list[tuple[float, float, float, float]]:
    """The crop boxes one thumbnail is aligned with: each axis cropped by 0..MAX_CROP, at either end or both."""
    spans = {(0.0, float(SIDE))}
    for step in range(1, CROP_STEPS):
        cut = SIDE * MAX_CROP * step / (CROP_STEPS - 1)
        spans |= {(0.0, SIDE - cut), (cut / 2, SIDE - cut / 2), (cut, float(SIDE))}
    spans = sorted(spans)
    return [(x0, y0, x1, y1) for (x0, x1), (y0, y1) in itertools.product(spans, spans)]


def _normalised(pixels: np.ndarray) -> np.ndarray:
    """Centred, unit-length vectors of the thumbnails' inner pixels (a dot product is then a correlation)."""
    inner = pixels[..., BORDER : SIDE - BORDER, BORDER : SIDE - BORDER].reshape(*pixels.shape[:-2], -1)
    inner = inner - inner.mean(axis=-1, keepdims=True)
    return inner / np.maximum(np.linalg.norm(inner, axis=-1, keepdims=True), 1e-3)


def _weights(starts: np.ndarray, ends: np.ndarray, points: int = SIDE, pixels: int = SIDE) -> np.ndarray:
    """Bilinear resampling matrices (m, points, pixels): row k of matrix i samples [starts[i], ends[i]) of a
    line of `pixels` at its k-th of `points` evenly spaced points, from pixel centres (the edge pixel repeats
    beyond the line)."""
    position = starts[:, None] + (np.arange(points) + 0.5)[None, :] * ((ends - starts) / points)[:, None] - 0.5
    position = np.clip(position, 0.0, pixels - 1.0)
    low = np.floor(position).astype(int)
    high, fraction = np.minimum(low + 1, pixels - 1), (position - low).astype(np.float32)
    matrices = np.zeros((len(starts), points, pixels), np.float32)
    which, point = np.meshgrid(np.arange(len(starts)), np.arange(points), indexing="ij")
    matrices[which, point, low] = 1.0 - fraction
    matrices[which, point, high] += fraction
    return matrices


def self_similarity(thumbs: np.ndarray) -> np.ndarray:
    """How alike each thumbnail stays to a copy of itself (float (n,)): its correlation with itself resampled
    at COPY_SCALE of its size from a box shifted by COPY_SHIFT px, and back. A sharp image (a letter's edges)
    loses more to a copy than a smooth one (a photo) does; a pair of images must be at least as alike as the
    sharper of the two is to such a copy of itself (see near_copy_groups)."""
    one = np.ones(1)
    small = round(SIDE * COPY_SCALE)
    down = _weights(one * COPY_SHIFT, one * (SIDE - COPY_SHIFT), small)[0]
    up = _weights(np.zeros(1), one * small, SIDE, small)[0]
    copies = up @ (down @ thumbs @ down.T) @ up.T
    return np.einsum("ij,ij->i", _normalised(thumbs), _normalised(copies))


def resampling(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The row and column matrices that crop boxes (x0, y0, x1, y1 in pixels) and resample to SIDE x SIDE."""
    return _weights(boxes[:, 1], boxes[:, 3]), _weights(boxes[:, 0], boxes[:, 2]).transpose(0, 2, 1)


def crops(thumb: np.ndarray, matrices: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The thumbnail's crops, from `resampling`'s matrices: (m, SIDE, SIDE)."""
    rows, columns = matrices
    return rows @ thumb[None] @ columns


class Verifier:
    """Aligned correlations between thumbnails, with each image's grid of aligned crops computed once.

    A pair's grid score within `REFINE_WITHIN` of `refine_above + REFINE_WITHIN` is refined: the best crop
    box's edges move by 1, 0.5 and 0.25 px while the correlation improves (a copy's exact crop rarely lies
    on the grid; an alike-but-distinct image gains little from it)."""

    def __init__(self, thumbs: np.ndarray, refine_above: float = 1.0):
        self.thumbs, self.full = thumbs, _normalised(thumbs)
        self.boxes, self.banks, self.known, self.refine_above = np.array(_boxes()), {}, {}, refine_above
        self.grid = resampling(self.boxes)

    def bank(self, i: int) -> np.ndarray:
        if i not in self.banks:
            self.banks[i] = _normalised(crops(self.thumbs[i], self.grid))
        return self.banks[i]

    def _aligned(self, source: int, target: int) -> float:
        """The best correlation of a crop of `source` with the whole of `target`."""
        scores = self.bank(source) @ self.full[target]
        best = int(scores.argmax())
        score, box = float(scores[best]), self.boxes[best]
        if score < self.refine_above:
            return score
        moves = np.concatenate([np.eye(4), -np.eye(4)])
        for step in (1.0, 0.5, 0.25):
            while True:
                tried = box[None, :] + step * moves
                inside = ((tried >= 0) & (tried <= SIDE)).all(axis=1) & (
                    np.minimum(tried[:, 2] - tried[:, 0], tried[:, 3] - tried[:, 1]) >= SIDE * (1 - 2 * MAX_CROP)
                )
                if not inside.any():
                    break
                values = _normalised(crops(self.thumbs[source], resampling(tried[inside]))) @ self.full[target]
                if values.max() <= score + 1e-5:
                    break
                score, box = float(values.max()), tried[inside][int(values.argmax())]
        return score

    def similarity(self, i: int, j: int) -> float:
        """The best correlation of one image with a crop of the other, either way round."""
        key = (min(i, j), max(i, j))
        if key not in self.known:
            self.known[key] = max(self._aligned(i, j), self._aligned(j, i))
        return self.known[key]


@dataclass(frozen=True)
class NearCopyGroup:
    members: list[int]  # indexes into the thumbnails, ascending
    similarity: float  # the lowest similarity of the verified pairs that linked the members
    links: list[tuple[int, int]]  # those pairs (indexes into the thumbnails)


def required_similarity(min_similarity: float, sides: np.ndarray) -> np.ndarray:
    """The similarity a pair must reach, per image: `min_similarity` for images at least SIDE pixels on their
    shorter side; closer to 1 for smaller ones, whose upsampled thumbnails hold fewer independent pixels
    (two different 8x8 digits correlate highly by chance): 1 - (1 - min_similarity) x (side / SIDE)^2."""
    return 1.0 - (1.0 - min_similarity) * np.clip(np.asarray(sides, dtype=np.float64) / SIDE, 0.0, 1.0) ** 2


@dataclass(frozen=True)
class NearCopies:
    groups: list[NearCopyGroup]
    best_match: list[int]  # per thumbnail: the index of its best match (see the module docstring), or -1


def near_copy_groups(thumbs: np.ndarray, settings, sides: np.ndarray | None = None) -> list[NearCopyGroup]:
    """Groups of two or more verified near copies (see `near_copies`)."""
    return near_copies(thumbs, settings, sides).groups


def near_copies(thumbs: np.ndarray, settings, sides: np.ndarray | None = None) -> NearCopies:
    """Groups of two or more verified near copies and each image's best match (see the module docstring);
    `settings`: the `validate.near_duplicates` params; `sides`: each image's shorter side in pixels (None:
    all at least SIDE). Deterministic: the same thumbnails give the same groups and matches."""
    unmatched = [-1] * len(thumbs)
    if settings.method == "none" or len(thumbs) < 2:
        return NearCopies([], unmatched)
    sides = np.full(len(thumbs), SIDE) if sides is None else np.asarray(sides)
    need = required_similarity(settings.min_similarity, sides)
    verifier = Verifier(thumbs, refine_above=float(need.min()) - REFINE_WITHIN)
    if settings.method == "moments":
        (coarse,) = canonical(thumbs)
        pairs = nearest_pairs(coarse, settings.neighbours, floor=float(need.min()) - PROPOSE_BELOW)
    else:
        bits = hash_bits(thumbs, settings.method)
        pairs = np.array(candidate_pairs(bits, settings.hash_distance, settings.neighbours), int).reshape(-1, 2)
    # a cheap sieve before the alignment: the better of a finer moment-normalised view and the plain thumbnails
    if not len(pairs):
        return NearCopies([], unmatched)
    involved = np.unique(pairs)  # only these need the finer view and their own-copy similarity
    finer, own = np.zeros((len(thumbs), (2 * CANONICAL_SIDE) ** 2), np.float32), np.ones(len(thumbs))
    (finer[involved],) = canonical(thumbs[involved], (2 * CANONICAL_SIDE,))
    own[involved] = self_similarity(thumbs[involved])
    first, second = pairs[:, 0], pairs[:, 1]
    sieve = np.maximum(
        np.einsum("ij,ij->i", finer[first], finer[second]),
        np.einsum("ij,ij->i", verifier.full[first], verifier.full[second]),
    )
    needed = np.maximum(np.maximum(need[first], need[second]), np.minimum(own[first], own[second]))
    passed = sieve >= needed - SIEVE
    pairs, needed = pairs[passed].tolist(), dict(zip(map(tuple, pairs[passed].tolist()), needed[passed].tolist()))
    verified = sorted(((verifier.similarity(i, j), i, j) for i, j in pairs), key=lambda edge: (-edge[0], edge[1]))
    group_of, members = list(range(len(thumbs))), {i: [i] for i in range(len(thumbs))}
    lowest: dict[int, float] = {}
    links: dict[int, list[tuple[int, int]]] = {}
    for score, i, j in verified:
        a, b = group_of[i], group_of[j]
        if score < needed[i, j] or a == b or len(members[a]) + len(members[b]) > settings.max_group_size:
            continue
        keep, gone = min(a, b), max(a, b)
        for index in members[gone]:
            group_of[index] = keep
        members[keep] += members.pop(gone)
        lowest[keep] = min([score] + [lowest.pop(g) for g in (a, b) if g in lowest])
        links[keep] = links.pop(a, []) + links.pop(b, []) + [(i, j)]
    best_match = unmatched.copy()
    for score, i, j in verified:  # best first: an image's first pair close enough is its best match
        if 1.0 - score <= LIKELY * (1.0 - needed[i, j]) and min(sides[i], sides[j]) >= SIDE:
            for one, other in ((i, j), (j, i)):
                if best_match[one] < 0:
                    best_match[one] = other
    groups = sorted(
        (NearCopyGroup(sorted(m), round(lowest[g], 4), sorted(links[g])) for g, m in members.items() if len(m) > 1),
        key=lambda group: group.members,
    )
    return NearCopies(groups, best_match)
