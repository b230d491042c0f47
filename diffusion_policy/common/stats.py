"""Confidence intervals for evaluation results."""

import math

import numpy as np

Z95 = 1.959964


def mean_ci(values, z=Z95, bounds=(0.0, 1.0)):
    """(mean, low, high): normal-approximation 95 % interval of the mean (sample std, n - 1),
    clipped to `bounds` (the metrics here live in [0, 1]; None for no clipping)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (float("nan"),) * 3
    mean = float(x.mean())
    half = z * float(x.std(ddof=1)) / math.sqrt(x.size) if x.size > 1 else float("nan")
    low, high = mean - half, mean + half
    if bounds is not None and x.size > 1:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return mean, low, high


def wilson_ci(successes, n, z=Z95):
    """(rate, low, high): Wilson score 95 % interval of a binomial proportion."""
    if n == 0:
        return (float("nan"),) * 3
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return p, max(0.0, centre - half), min(1.0, centre + half)


RUINED_DROP = 0.5  # a start is ruined when its final score falls by more than this (a near-success undone)
NEAR_MISS = 0.9  # a failed start whose score reached this is a near miss (success needs coverage 0.95)


def start_changes(success, score, base_success, base_score):
    """How a policy changed the outcome start by start against a base on the same starts (arrays in
    the same order): starts won / lost (success gained / lost), starts ruined (score down by more
    than RUINED_DROP), the base's near misses (failures with score >= NEAR_MISS) and how many of
    them became successes."""
    s, c = np.asarray(success, float), np.asarray(score, float)
    bs, bc = np.asarray(base_success, float), np.asarray(base_score, float)
    near = (bs == 0) & (bc >= NEAR_MISS)
    return {"starts": int(len(s)), "won": int(((s - bs) > 0).sum()), "lost": int(((s - bs) < 0).sum()),
            "ruined": int(((bc - c) > RUINED_DROP).sum()), "base_near_misses": int(near.sum()),
            "near_misses_converted": int((near & (s == 1)).sum()), "base_successes": int(bs.sum())}
