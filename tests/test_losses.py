"""Tests of EpsilonInfoNCE and of the SparK reconstruction + contrastive loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from custom_components.losses import EpsilonInfoNCE, SparKContrastiveLoss


def direct_epsilon_infonce(z_a, z_b, temperature, epsilon):
    """Term-by-term loop over the 2N anchors, with plain exp / log (no logsumexp)."""
    z_a = [v / v.norm() for v in z_a.double()]
    z_b = [v / v.norm() for v in z_b.double()]
    n = len(z_a)
    views = z_a + z_b
    total = 0.0
    for i in range(2 * n):
        sample = i % n
        pos = (i + n) % (2 * n)
        s_pos = float(views[i] @ views[pos]) / temperature
        denominator = math.exp(s_pos - epsilon)
        for j in range(2 * n):
            if j % n != sample:
                denominator += math.exp(float(views[i] @ views[j]) / temperature)
        total += -math.log(math.exp(s_pos) / denominator)
    return total / (2 * n)


def nt_xent(z_a, z_b, temperature):
    """Standard 2N-anchor NT-Xent as a cross-entropy over all other embeddings."""
    z = F.normalize(torch.cat([z_a, z_b]), dim=1)
    n = z_a.shape[0]
    logits = z @ z.t() / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, labels)


@pytest.mark.parametrize("temperature,epsilon", [(0.07, 0.5), (0.5, 0.0), (1.0, 2.0)])
def test_matches_direct_loop(temperature, epsilon):
    gen = torch.Generator().manual_seed(0)
    z_a = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    z_b = z_a + 0.5 * torch.randn(5, 8, generator=gen, dtype=torch.float64)
    got = EpsilonInfoNCE(temperature, epsilon)(z_a, z_b)
    assert got.item() == pytest.approx(direct_epsilon_infonce(z_a, z_b, temperature, epsilon), rel=1e-9)


def test_known_answers():
    # one sample: no negatives, loss = -log(exp(s) / exp(s - eps)) = -eps
    z = torch.tensor([[1.0, 2.0, 3.0]])
    assert EpsilonInfoNCE(0.07, 0.5)(z, -z).item() == pytest.approx(-0.5, abs=1e-5)
    # two orthogonal samples, identical views: s+ = 1/T, the two negatives have s = 0
    t, eps = 0.5, 0.3
    z = torch.eye(2, 4)
    expected = -1 / t + math.log(math.exp(1 / t - eps) + 2.0)
    assert EpsilonInfoNCE(t, eps)(z, z).item() == pytest.approx(expected, abs=1e-5)


def test_epsilon_zero_is_nt_xent():
    gen = torch.Generator().manual_seed(1)
    z_a, z_b = torch.randn(2, 6, 16, generator=gen)
    got = EpsilonInfoNCE(temperature=0.1, epsilon=0.0)(z_a, z_b)
    torch.testing.assert_close(got, nt_xent(z_a, z_b, 0.1))
    # a positive epsilon lowers the positive's weight in the denominator, so the loss drops
    assert EpsilonInfoNCE(temperature=0.1, epsilon=0.5)(z_a, z_b) < got


@pytest.mark.parametrize("all_rows_equal", [False, True])
def test_finite_gradients_for_identical_inputs(all_rows_equal):
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(1 if all_rows_equal else 8, 32, generator=gen).expand(8, 32).clone()
    z_a = base.clone().requires_grad_(True)
    z_b = base.clone().requires_grad_(True)
    loss = EpsilonInfoNCE(temperature=0.07, epsilon=0.5)(z_a, z_b)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z_a.grad).all() and torch.isfinite(z_b.grad).all()


def test_invariant_to_input_scaling():
    gen = torch.Generator().manual_seed(3)
    z_a, z_b = torch.randn(2, 6, 10, generator=gen)
    scale = torch.rand(6, 1, generator=gen) * 100 + 0.01
    loss = EpsilonInfoNCE()
    torch.testing.assert_close(loss(z_a * scale, 0.05 * z_b), loss(z_a, z_b))


def test_rejects_mismatched_views():
    with pytest.raises(ValueError, match="equal shape"):
        EpsilonInfoNCE()(torch.randn(4, 8), torch.randn(3, 8))


def _prediction(target, patch_mask, z_masked, z_intact):
    return {"reconstruction": target.clone(), "patch_mask": patch_mask, "z_masked": z_masked, "z_intact": z_intact}


def test_reconstruction_counts_hidden_patches_only():
    target = torch.rand(2, 1, 64, 96)
    patch_mask = torch.zeros(2, 1, 2, 3, dtype=torch.bool)
    patch_mask[:, 0, 0, :] = True  # top row of patches visible, bottom row (3 patches per sample) hidden
    z = torch.eye(2, 4)
    pred = _prediction(target, patch_mask, z, z)
    pred["reconstruction"][:, :, :32, :] += 5.0  # errors in visible patches are ignored
    pred["reconstruction"][0, :, 32:, :32] += 2.0  # one hidden patch of one sample is off by 2
    loss_fn = SparKContrastiveLoss(temperature=0.5, epsilon=0.3, contrastive_weight=0.25)
    total = loss_fn(pred, target)
    hidden_pixels = 2 * 3 * 32 * 32
    expected_rec = 4.0 * 32 * 32 / hidden_pixels
    expected_con = -1 / 0.5 + math.log(math.exp(1 / 0.5 - 0.3) + 2.0)
    assert loss_fn.last_parts["reconstruction"].item() == pytest.approx(expected_rec, rel=1e-6)
    assert loss_fn.last_parts["contrastive"].item() == pytest.approx(expected_con, abs=1e-5)
    assert total.item() == pytest.approx(expected_rec + 0.25 * expected_con, abs=1e-5)


def test_loss_gradient_reaches_embeddings():
    target = torch.rand(3, 1, 32, 32)
    z_m = torch.randn(3, 8, requires_grad=True)
    z_i = torch.randn(3, 8, requires_grad=True)
    patch_mask = torch.zeros(3, 1, 1, 1, dtype=torch.bool)
    pred = _prediction(target, patch_mask, z_m, z_i)
    pred["reconstruction"].requires_grad_(True)
    SparKContrastiveLoss()(pred, target).backward()
    assert z_m.grad.abs().sum() > 0 and z_i.grad.abs().sum() > 0
