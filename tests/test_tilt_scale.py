"""benchmarks/tilt_scale.py: tilt and best-of-k gains against Gaussian closed forms and brute force."""

import itertools

import pytest
import torch

from benchmarks.tilt_scale import best_of_gain, matching_lambda, tilt_gain


def test_best_of_gain_equals_brute_force_over_subsets():
    r = torch.randn(3, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for k in (1, 2, 3, 7):
        brute = torch.stack([torch.tensor([float(row[list(s)].max()) for s in itertools.combinations(range(7), k)], dtype=torch.float64).mean()
                             - row.mean() for row in r]).mean()
        assert best_of_gain(r, k) == pytest.approx(float(brute), abs=1e-9)
    assert best_of_gain(r, 1) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="best of k"):
        best_of_gain(r, 8)


def test_gains_match_gaussian_closed_forms():
    # r ~ N(m_s, s^2) per state: the tilt exp(lam r) shifts the mean by lam s^2 (and keeps the
    # variance); the best of 4 standard normals has expectation 1.029375.
    s = 0.02
    g = torch.Generator().manual_seed(1)
    r = 0.5 + torch.randn(50, 1, generator=g) + s * torch.randn(50, 4000, generator=g, dtype=torch.float64)
    for lam in (5.0, 20.0):
        gain, ess = tilt_gain(r, lam)
        assert gain == pytest.approx(lam * s ** 2, rel=0.08)
        assert ess == pytest.approx(float(torch.exp(torch.tensor(-(lam * s) ** 2))), rel=0.05)  # ESS/N = e^{-lam^2 s^2}
    assert tilt_gain(r, 0.0)[0] == pytest.approx(0.0, abs=1e-12)
    assert best_of_gain(r, 4) == pytest.approx(1.029375 * s, rel=0.05)
    lam = matching_lambda(r, best_of_gain(r, 4))
    assert lam == pytest.approx(1.029375 / s, rel=0.08)  # lam s^2 = 1.029 s
    assert matching_lambda(r, 10.0) is None  # a gain no tilt of these samples can reach
