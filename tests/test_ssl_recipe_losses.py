"""The recipes' losses against their published formulations, on fixed inputs.

Each reference is written here from the paper's code, independently of lightly and of
wsi_ssl: DINOv2's ``sinkhorn_knopp_teacher``, ``DINOLoss.forward`` and
``iBOTPatchLoss.forward_masked`` (facebookresearch/dinov2, ``dinov2/loss``), the KoLeo
estimator (Sablayrolles et al., 2019) and MAE's ``forward_loss`` (facebookresearch/mae).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lightly.loss import IBOTPatchLoss, KoLeoLoss

from wsi_ssl.ssl.recipes.class_token import dino_cross_entropy
from wsi_ssl.ssl.recipes.dinov2 import ibot_cross_entropy, sinkhorn_knopp
from wsi_ssl.ssl.recipes.mae import mae_loss


def _reference_sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=3):
    # dinov2/loss/dino_clstoken_loss.py, single process
    teacher_output = teacher_output.float()
    Q = torch.exp(teacher_output / teacher_temp).t()
    B = Q.shape[1]
    K = Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def test_sinkhorn_knopp_matches_dinov2() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(12, 40, generator=g) * 0.3
    ours = sinkhorn_knopp(t, 0.07, 3)
    torch.testing.assert_close(ours, _reference_sinkhorn_knopp(t, 0.07, 3), rtol=1e-5, atol=1e-7)
    assert torch.allclose(ours.sum(dim=1), torch.ones(12), atol=1e-5)  # a distribution per sample
    # the prototypes are used about equally (the point of the centring)
    assert ours.sum(dim=0).std() < F.softmax(t / 0.07, dim=1).sum(dim=0).std()


def test_sinkhorn_knopp_survives_logits_whose_exp_overflows() -> None:
    t = 3.0 + torch.rand(5, 8, generator=torch.Generator().manual_seed(6))  # exp(t / 0.04) = inf
    assert not torch.isfinite(_reference_sinkhorn_knopp(t, 0.04)).all()
    ours = sinkhorn_knopp(t, 0.04)
    torch.testing.assert_close(ours, _reference_sinkhorn_knopp(t.double() - 3.0, 0.04).float())


def _reference_dino_loss(student_output_list, teacher_out_softmaxed_centered_list, student_temp):
    # dinov2/loss/dino_clstoken_loss.py DINOLoss.forward; ssl_meta_arch divides by the terms
    total_loss = 0
    for s in student_output_list:
        lsm = F.log_softmax(s / student_temp, dim=-1)
        for t in teacher_out_softmaxed_centered_list:
            loss = torch.sum(t * lsm, dim=-1)
            total_loss -= loss.mean()
    return total_loss


def test_dino_cross_entropy_matches_dinov2_global_and_local_terms() -> None:
    g = torch.Generator().manual_seed(1)
    b, k, n_local = 6, 32, 3
    teacher = [F.softmax(torch.randn(b, k, generator=g), dim=-1) for _ in range(2)]
    student = [torch.randn(b, k, generator=g) for _ in range(2 + n_local)]
    ours = dino_cross_entropy(teacher, student, 0.1)
    # ssl_meta_arch: local crops against both teacher crops; global crops against the other
    # teacher crop (teacher list swapped); divided by the number of terms
    local = _reference_dino_loss(student[2:], teacher, 0.1)
    glob = _reference_dino_loss([student[0]], [teacher[1]], 0.1) + _reference_dino_loss(
        [student[1]], [teacher[0]], 0.1
    )
    n_terms = n_local * 2 + 2
    torch.testing.assert_close(ours, (local + glob) / n_terms)


def _reference_ibot_forward_masked(
    student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat, student_temp
):
    # dinov2/loss/ibot_patch_loss.py iBOTPatchLoss.forward_masked
    t = teacher_patch_tokens_masked
    s = student_patch_tokens_masked
    loss = torch.sum(t * F.log_softmax(s / student_temp, dim=-1), dim=-1)
    masks_weight = (
        (1 / student_masks_flat.sum(-1).clamp(min=1.0))
        .unsqueeze(-1)
        .expand_as(student_masks_flat)[student_masks_flat]
    )
    loss = loss * masks_weight
    return -loss.sum() / student_masks_flat.shape[0]


def _masks() -> torch.Tensor:
    masks = torch.zeros(4, 3, 3, dtype=torch.bool)
    masks[0, :2, :2] = True  # 4 patches
    masks[2, 1, :] = True  # 3 patches
    masks[3, 0, 0] = True  # 1 patch; image 1 has none
    return masks


def test_ibot_cross_entropy_matches_dinov2() -> None:
    g = torch.Generator().manual_seed(2)
    masks = _masks()
    m, k = int(masks.sum()), 16
    teacher = F.softmax(torch.randn(m, k, generator=g), dim=-1)
    student = torch.randn(m, k, generator=g)
    ours = ibot_cross_entropy(teacher, student, masks, 0.1)
    ref = _reference_ibot_forward_masked(student, teacher, masks.flatten(1), 0.1)
    torch.testing.assert_close(ours, ref)


def test_ibot_cross_entropy_agrees_with_lightly_on_centred_targets() -> None:
    """With lightly's mean-centred softmax as targets, the same weighting as IBOTPatchLoss."""
    g = torch.Generator().manual_seed(3)
    masks = _masks()
    m, k = int(masks.sum()), 16
    teacher_out = torch.randn(m, k, generator=g)
    student = torch.randn(m, k, generator=g)
    lightly_loss = IBOTPatchLoss(output_dim=k, teacher_temp=0.05, student_temp=0.1)
    expected = lightly_loss(teacher_out, student, masks)
    ours = ibot_cross_entropy(F.softmax(teacher_out / 0.05, dim=-1), student, masks, 0.1)
    torch.testing.assert_close(ours, expected)


def test_ibot_cross_entropy_without_masked_patches_is_zero() -> None:
    masks = torch.zeros(2, 3, 3, dtype=torch.bool)
    student = torch.zeros(0, 8, requires_grad=True)
    loss = ibot_cross_entropy(torch.zeros(0, 8), student, masks, 0.1)
    assert float(loss.detach()) == 0.0 and loss.requires_grad


def test_koleo_is_the_nearest_neighbour_log_distance() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 5, generator=g)
    z = F.normalize(x, dim=-1)
    ref = 0.0
    for i in range(len(z)):
        d = min(float(torch.linalg.vector_norm(z[i] - z[j])) for j in range(len(z)) if j != i)
        ref -= math.log(d + 1e-8)
    torch.testing.assert_close(KoLeoLoss()(x), torch.tensor(ref / len(z)), rtol=1e-4, atol=1e-5)


def _reference_mae_loss(pred, target, norm_pix_loss):
    # facebookresearch/mae models_mae.py forward_loss, on the masked patches only
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred - target) ** 2
    return loss.mean(dim=-1).mean()


def test_mae_loss_matches_the_paper() -> None:
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(3, 5, 48, generator=g)
    target = torch.rand(3, 5, 48, generator=g) * 4
    for norm in (True, False):
        torch.testing.assert_close(
            mae_loss(pred, target, norm), _reference_mae_loss(pred, target, norm)
        )
