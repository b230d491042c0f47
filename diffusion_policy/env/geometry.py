"""Push-T geometry: the T-shaped block, the goal pose, block keypoints and coverage.

Coordinates are the benchmark's pixels: a 512 x 512 workspace, x to the right, y down (the
pymunk frame as pygame draws it), angles in radians. A pose is (x, y, angle) of the block's
body origin, which is `body.position` in pymunk (not its centre of gravity).

Coverage is computed exactly, without shapely: each T is the union of two rectangles with
disjoint interiors, so area(goal T & block T) is the sum of four convex-convex
intersections, each clipped with Sutherland-Hodgman. Tests check it against shapely.
"""

import math

import numpy as np

# ----------------------------------------------------------------------------------------
# The block, in its body frame. Vertices and physical constants of the original env
# (real-stanford/diffusion_policy, PushTEnv.add_tee with scale 30, length 4).
# ----------------------------------------------------------------------------------------
T_BAR = ((-60.0, 30.0), (60.0, 30.0), (60.0, 0.0), (-60.0, 0.0))
T_STEM = ((-15.0, 30.0), (-15.0, 120.0), (15.0, 120.0), (15.0, 30.0))
T_PIECES = (T_BAR, T_STEM)
T_AREA = 120.0 * 30.0 + 30.0 * 90.0  # 6300 px^2

BLOCK_MASS = 1.0
# The original adds the bar's moment twice (its stem term reuses the bar's vertices):
# moment_for_poly(1, T_BAR) about the body origin is 1500, so the block's moment is 3000.
BLOCK_MOMENT = 3000.0
# The plain mean of the two rectangles' centroids (0, 15) and (0, 75), as in the original
# (not area-weighted). Replays of the demonstrations drift if this is changed.
BLOCK_COG = (0.0, 45.0)

GOAL_POSE = (256.0, 256.0, math.pi / 4)
SUCCESS_COVERAGE = 0.95

# The 9 block keypoints of the dataset, in the body frame, recovered from the recorded
# (state, keypoint) pairs by least squares over all 25,650 frames (mean residual 0.003 px).
KEYPOINTS_LOCAL = np.array(
    [
        [9.269522, 90.041072],
        [-60.983299, -1.186964],
        [60.912926, -1.393017],
        [-0.270460, 25.543679],
        [-14.065347, 122.815840],
        [39.002746, 32.857646],
        [-39.966404, 32.729520],
        [-16.824478, 62.863153],
        [23.541634, -1.700119],
    ]
)


def _signed_area(poly):
    """Shoelace area of a polygon given as a sequence of (x, y); positive if counter-clockwise."""
    area = 0.0
    px, py = poly[-1]
    for qx, qy in poly:
        area += px * qy - qx * py
        px, py = qx, qy
    return 0.5 * area


def _ccw(poly):
    return tuple(poly) if _signed_area(poly) > 0 else tuple(reversed(poly))


# Pieces in counter-clockwise order, with a bounding circle (centre, radius) for early exits.
_PIECES_CCW = tuple(_ccw(p) for p in T_PIECES)
_PIECE_CIRCLES = tuple(
    (
        (sum(x for x, _ in p) / 4.0, sum(y for _, y in p) / 4.0),
        max(math.hypot(x - sum(v[0] for v in p) / 4.0, y - sum(v[1] for v in p) / 4.0) for x, y in p),
    )
    for p in _PIECES_CCW
)


def _to_world(points, pose):
    """Body-frame points -> world: R(angle) @ p + (x, y)."""
    x, y, angle = pose
    c, s = math.cos(angle), math.sin(angle)
    return [(x + c * px - s * py, y + s * px + c * py) for px, py in points]


def _half_planes(poly_ccw):
    """Edges of a convex CCW polygon as (nx, ny, c): a point q is inside where n.q >= c."""
    planes = []
    px, py = poly_ccw[-1]
    for qx, qy in poly_ccw:
        nx, ny = -(qy - py), qx - px  # left normal of the edge p -> q
        planes.append((nx, ny, nx * px + ny * py))
        px, py = qx, qy
    return planes


def _clip(poly, planes):
    """Sutherland-Hodgman: the part of polygon `poly` inside all half-planes (a convex clipper)."""
    for nx, ny, c in planes:
        if not poly:
            break
        out = []
        px, py = poly[-1]
        dp = nx * px + ny * py - c
        for qx, qy in poly:
            dq = nx * qx + ny * qy - c
            if dq >= 0.0:
                if dp < 0.0:  # entering: add the crossing point, then q
                    t = dp / (dp - dq)
                    out.append((px + t * (qx - px), py + t * (qy - py)))
                out.append((qx, qy))
            elif dp >= 0.0:  # leaving: add the crossing point only
                t = dp / (dp - dq)
                out.append((px + t * (qx - px), py + t * (qy - py)))
            px, py, dp = qx, qy, dq
        poly = out
    return poly


class _Target:
    """A fixed T pose (the goal), pre-transformed for fast overlap tests against any block pose."""

    def __init__(self, pose):
        self.pieces = [_to_world(p, pose) for p in _PIECES_CCW]
        self.planes = [_half_planes(p) for p in self.pieces]
        self.circles = [(_to_world([centre], pose)[0], r) for centre, r in _PIECE_CIRCLES]

    def overlap_area(self, pose):
        """area(this T & the T at `pose`), exact up to floating point."""
        x, y, angle = pose
        c, s = math.cos(angle), math.sin(angle)
        area = 0.0
        for piece, ((cx, cy), r) in zip(_PIECES_CCW, _PIECE_CIRCLES):
            wx, wy = x + c * cx - s * cy, y + s * cx + c * cy
            world = None
            for planes, ((gx, gy), gr) in zip(self.planes, self.circles):
                if (wx - gx) ** 2 + (wy - gy) ** 2 >= (r + gr) ** 2:
                    continue  # bounding circles apart: no overlap
                if world is None:
                    world = [(x + c * px - s * py, y + s * px + c * py) for px, py in piece]
                clipped = _clip(world, planes)
                if len(clipped) >= 3:
                    area += _signed_area(clipped)
        return area


_GOAL = _Target(GOAL_POSE)


def coverage(block_pose):
    """Fraction of the goal T covered by the block T at `block_pose` = (x, y, angle), in [0, 1]."""
    return _GOAL.overlap_area(block_pose) / T_AREA


def reward_from_coverage(cov):
    """The benchmark's reward: clip(coverage / 0.95, 0, 1)."""
    return min(max(cov / SUCCESS_COVERAGE, 0.0), 1.0)


def block_keypoints(block_pose):
    """World (x, y) of the 9 block keypoints, shape (9, 2), for a pose (x, y, angle)."""
    x, y, angle = block_pose
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return KEYPOINTS_LOCAL @ rot.T + np.array([x, y])


def block_vertices(block_pose):
    """World vertices of the two T pieces at a pose: a list of two lists of (x, y)."""
    return [_to_world(p, block_pose) for p in T_PIECES]
