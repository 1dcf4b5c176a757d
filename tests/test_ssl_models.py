"""Backbone registry, DINO student/teacher, the loss as we call it, schedules, clipping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsi_ssl.ssl.backbones import backbone_names, build_backbone, get_spec
from wsi_ssl.ssl.config import PretrainConfig
from wsi_ssl.ssl.models import MultiCropModel, build_dino
from wsi_ssl.ssl.optim import clip_gradients
from wsi_ssl.ssl.schedules import Schedules


@pytest.mark.parametrize("name", backbone_names())
def test_every_registered_backbone_maps_crops_to_features(name: str) -> None:
    spec = get_spec(name)
    torch.manual_seed(0)
    model = build_backbone(name, input_size=spec.default_input_size).eval()
    local = max(spec.patch_size * 2, spec.default_input_size // 2)
    with torch.no_grad():
        for size in (spec.default_input_size, local):
            out = model(torch.randn(2, 3, size, size))
            assert out.shape == (2, spec.embed_dim), (name, size)
            assert torch.isfinite(out).all()
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert has_bn == spec.batch_norm


def _tiny_config(**changes) -> PretrainConfig:
    base = {
        "arch": "resnet18_tiny",
        "global_crop_size": 32,
        "local_crop_size": 16,
        "out_dim": 64,
        "hidden_dim": 32,
        "bottleneck_dim": 16,
    }
    return PretrainConfig.preset("cpu-small", **{**base, **changes})


def test_student_and_teacher_start_equal_and_teacher_takes_no_gradients() -> None:
    torch.manual_seed(0)
    student, teacher = build_dino(_tiny_config())
    for (ks, vs), (kt, vt) in zip(
        student.state_dict().items(), teacher.state_dict().items(), strict=True
    ):
        assert ks == kt and torch.equal(vs, vt)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert any(p.requires_grad for p in student.parameters())


def test_multicrop_model_runs_each_resolution_once() -> None:
    torch.manual_seed(0)
    student, _ = build_dino(_tiny_config())
    calls: list[tuple[int, ...]] = []
    student.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    crops = [torch.randn(3, 3, 32, 32)] * 2 + [torch.randn(3, 3, 16, 16)] * 4
    out = student(crops)
    assert out.shape == (18, 64)
    assert calls == [(6, 3, 32, 32), (12, 3, 16, 16)]
    assert isinstance(student, MultiCropModel)


def _reference_dino_loss(teacher_output, student_output, center, ncrops, temp, student_temp, m):
    """The loss and centre update of facebookresearch/dino ``main_dino.py`` (pinned copy)."""
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / temp, dim=-1).detach().chunk(2)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    total_loss /= n_loss_terms
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
    return total_loss, center * m + batch_center * (1 - m)


def test_dino_loss_as_called_matches_the_original() -> None:
    from lightly.loss import DINOLoss

    torch.manual_seed(0)
    k, b, ncrops = 32, 5, 6
    criterion = DINOLoss(output_dim=k, warmup_teacher_temp_epochs=0, center_momentum=0.9)
    criterion.center.copy_(torch.randn(1, 1, k) * 0.1)
    center = criterion.center.clone().view(1, k)
    teacher = torch.randn(2 * b, k)
    student = torch.randn(ncrops * b, k)
    # as in wsi_ssl.ssl.train: crop-major outputs chunked per crop
    ours = criterion(list(teacher.chunk(2)), list(student.chunk(ncrops)), teacher_temp=0.055)
    ref, ref_center = _reference_dino_loss(teacher, student, center, ncrops, 0.055, 0.1, 0.9)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(criterion.center.view(1, k), ref_center)


def test_dino_recipe_class_token_step_matches_lightly_and_the_original() -> None:
    """The DINO recipe's step (centring, the class-token loss shared with DINOv2, the centre
    update) gives lightly's DINOLoss and the original's loss and centre."""
    from lightly.loss import DINOLoss

    from wsi_ssl.ssl.recipes.dino import DINORecipe

    torch.manual_seed(0)
    k, b, ncrops, m = 32, 5, 6, 0.9
    config = PretrainConfig(
        arch="resnet18_tiny", out_dim=k, global_crop_size=64, local_crop_size=32
    ).replace(center_momentum=m, student_temp=0.1)
    recipe = DINORecipe(config)
    lightly_loss = DINOLoss(output_dim=k, warmup_teacher_temp_epochs=0, center_momentum=m)
    start = torch.randn(1, 1, k) * 0.1
    recipe.criterion.center.copy_(start)
    lightly_loss.center.copy_(start)
    teacher = torch.randn(2 * b, k)
    student = torch.randn(ncrops * b, k)
    ours = recipe.class_token_step(teacher, student, ncrops, teacher_temp=0.055)
    theirs = lightly_loss(list(teacher.chunk(2)), list(student.chunk(ncrops)), teacher_temp=0.055)
    ref, ref_center = _reference_dino_loss(
        teacher, student, start.view(1, k), ncrops, 0.055, 0.1, m
    )
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(recipe.criterion.center, lightly_loss.center)
    torch.testing.assert_close(recipe.criterion.center.view(1, k), ref_center)


def test_schedules_follow_dino() -> None:
    config = PretrainConfig(
        epochs=10, warmup_epochs=2, warmup_teacher_temp_epochs=3, freeze_last_layer_epochs=1
    )
    s = Schedules.from_config(config, steps_per_epoch=10, global_batch=512)
    assert s.total_steps == 100 and s.warmup_steps == 20
    assert s.lr(0) == 0 and s.lr(10) == pytest.approx(5e-4)  # halfway up to 2 * 5e-4
    assert s.lr(20) == pytest.approx(1e-3) and s.lr(99) == pytest.approx(1e-6)
    assert all(s.lr(i) >= s.lr(i + 1) for i in range(20, 99))
    assert s.weight_decay_at(0) == pytest.approx(0.04) and s.weight_decay_at(99) == pytest.approx(
        0.4
    )
    assert s.momentum(0) == pytest.approx(0.996) and s.momentum(99) == pytest.approx(1.0)
    assert s.teacher_temperature(0) == pytest.approx(0.04)
    assert s.teacher_temperature(15) == pytest.approx(0.055)
    assert s.teacher_temperature(30) == pytest.approx(0.07)
    assert s.last_layer_frozen(9) and not s.last_layer_frozen(10)
    short = Schedules.from_config(config.replace(steps=15), steps_per_epoch=10, global_batch=512)
    assert short.total_steps == 15 and short.teacher_temp_warmup_steps == 15  # clipped
    # a floor above the peak (the CPU preset's min_lr 3e-4 with --lr 0.001 at batch 32: peak
    # 1.25e-4) is the peak: the rate stays flat after warm-up (it rose to the floor)
    small = Schedules.from_config(
        PretrainConfig.preset("cpu-small", base_lr=0.001), steps_per_epoch=10, global_batch=32
    )
    assert small.min_lr == small.peak_lr == pytest.approx(1.25e-4)
    after = [small.lr(i) for i in range(small.warmup_steps, small.total_steps)]
    assert max(after) == pytest.approx(1.25e-4) and min(after) == pytest.approx(1.25e-4)


def test_clip_gradients_per_parameter() -> None:
    a = torch.nn.Parameter(torch.zeros(4))
    b = torch.nn.Parameter(torch.zeros(4))
    a.grad = torch.full((4,), 10.0)  # norm 20
    b.grad = torch.full((4,), 0.1)  # norm 0.2
    clip_gradients(iter([a, b]), 3.0)
    assert a.grad.norm().item() == pytest.approx(3.0, rel=1e-4)
    assert torch.equal(b.grad, torch.full((4,), 0.1))
