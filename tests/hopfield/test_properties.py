"""The paper's properties of the retrieval update, checked on the fused op (float64):
the energy never increases along the update steps (Theorem 1), one-step retrieval of a stored
pattern from a noisy query within the Theorem-5-style bound, large beta retrieving one pattern and
small beta the global average, metastable states (the average of a cluster) on clustered patterns.
"""
import math

import pytest
import torch

from pypaper.hopfield import energy, hopfield_retrieve


def _retrieve(xi, X, beta, steps, eps=0.0):
    """Run the op with K = V = X (stored patterns) on [L, d] states: returns xi after
    steps + 1 updates (out = P_steps X)."""
    q = xi.view(1, 1, *xi.shape)
    k = X.view(1, 1, *X.shape)
    return hopfield_retrieve(q, k, k, beta, steps, eps)[0, 0]


@pytest.mark.parametrize("beta", [0.1, 1.0, 8.0])
def test_energy_never_increases_along_the_steps(beta):
    torch.manual_seed(3)
    X = torch.randn(40, 16, dtype=torch.float64)
    xi0 = torch.randn(12, 16, dtype=torch.float64) * 2
    energies = [energy(xi0, X, beta)]
    for n in range(6):
        energies.append(energy(_retrieve(xi0, X, beta, n), X, beta))
    e = torch.stack(energies)  # [steps + 1, L]
    assert (e[1:] <= e[:-1] + 1e-10).all(), e
    assert (e[-1] < e[0]).all()
    # the energy is bounded below by 0 (eq. (2) with the constants)
    assert (e >= -1e-10).all()


def test_energy_matches_its_definition_and_checks_arguments():
    X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    xi = torch.tensor([0.5, 0.5], dtype=torch.float64)
    beta = 2.0
    want = (-math.log(math.exp(beta * 0.5) + math.exp(beta * 1.0)) / beta + 0.25
            + math.log(2) / beta + 0.5 * 4.0)
    assert abs(energy(xi, X, beta).item() - want) < 1e-12
    with pytest.raises(ValueError, match="beta"):
        energy(xi, X, 0.0)
    with pytest.raises(ValueError, match="pattern size"):
        energy(torch.zeros(3), X, 1.0)


def test_one_step_retrieval_from_noisy_queries_within_theorem_5():
    torch.manual_seed(4)
    N, d, beta = 64, 64, 2.0
    X = torch.randn(N, d, dtype=torch.float64)  # well separated in 64 dims
    M = X.norm(dim=1).max().item()
    noise = 0.05
    xi = X + noise * torch.randn(N, d, dtype=torch.float64)  # every pattern, perturbed
    out = _retrieve(xi, X, beta, 0)  # one update: out = X softmax(beta X^T xi)
    gram = X @ X.t()
    for i in range(N):
        delta_i = (gram[i, i] - torch.cat([gram[i, :i], gram[i, i + 1:]])).min().item()
        dist = (xi[i] - X[i]).norm().item()
        bound = 2 * M * (N - 1) * math.exp(-beta * (delta_i - 2 * M * dist))
        err = (out[i] - X[i]).norm().item()
        assert err <= bound + 1e-12, (i, err, bound)
    # and the retrieval is good in absolute terms
    assert ((out - X).norm(dim=1) / X.norm(dim=1)).max() < 1e-6


def test_large_beta_retrieves_one_pattern_small_beta_the_average():
    torch.manual_seed(5)
    X = torch.randn(30, 8, dtype=torch.float64)
    xi = torch.randn(5, 8, dtype=torch.float64)
    nearest = X[(xi @ X.t()).argmax(dim=1)]
    big = _retrieve(xi, X, 200.0, 0)
    torch.testing.assert_close(big, nearest, rtol=0, atol=1e-6)
    small = _retrieve(xi, X, 1e-6, 0)
    torch.testing.assert_close(small, X.mean(0).expand_as(small), rtol=0, atol=1e-4)
    # with several updates a small beta converges to the global fixed point near the mean
    many = _retrieve(xi, X, 1e-3, None, 1e-12)
    torch.testing.assert_close(many, X.mean(0).expand_as(many), rtol=0, atol=1e-3)


def test_metastable_state_is_the_cluster_average():
    torch.manual_seed(6)
    d, per = 32, 6
    centers = torch.randn(3, d, dtype=torch.float64)
    centers = 6 * centers / centers.norm(dim=1, keepdim=True)
    X = (centers.repeat_interleave(per, 0) + 0.05 * torch.randn(3 * per, d, dtype=torch.float64))
    beta = 1.0  # beta * (within-cluster differences) ~ 0, beta * (between clusters) >> 1
    xi = centers + 0.5 * torch.randn(3, d, dtype=torch.float64)
    fixed = _retrieve(xi, X, beta, None, 1e-10)
    for c in range(3):
        cluster = X[c * per:(c + 1) * per]
        avg = cluster.mean(0)
        assert (fixed[c] - avg).norm() < 0.05 * avg.norm()
        # a metastable state: no single stored pattern, the average of the cluster's patterns
        assert (cluster - fixed[c]).norm(dim=1).min() > 3 * (fixed[c] - avg).norm()
