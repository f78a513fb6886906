"""IBOTLoss against an explicit-loop transcription of the iBOT objective, centre updates, schedules."""

import math

import numpy as np
import pytest
import torch

from ibot.loss import IBOTLoss, teacher_temp_schedule

G, L, B, N, K, P = 2, 3, 4, 6, 10, 7
STUDENT_TEMP = 0.1


def _loss(**kwargs) -> IBOTLoss:
    args = dict(out_dim=K, patch_out_dim=P, ngcrops=G, nlcrops=L, warmup_teacher_temp=0.04, teacher_temp=0.07,
                warmup_teacher_temp2=0.05, teacher_temp2=0.08, warmup_teacher_temp_epochs=3, nepochs=10)
    args.update(kwargs)
    return IBOTLoss(**args)


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    s_cls = torch.randn(G * B, K, generator=gen) * 3
    s_local = torch.randn(L * B, K, generator=gen) * 3
    s_patch = torch.randn(G * B, N, P, generator=gen) * 3
    t_cls = torch.randn(G * B, K, generator=gen)
    t_patch = torch.randn(G * B, N, P, generator=gen)
    masks = [torch.rand(B, 2, 3, generator=gen) < 0.5 for _ in range(G)]
    masks[0][1] = False  # an image without masked patches
    masks[1][2] = False
    masks[1][3] = True  # and one fully masked
    return s_cls, s_local, s_patch, t_cls, t_patch, masks


def _ce(teacher_logits, center, t_temp, student_logits) -> float:
    """Cross-entropy of one (teacher, student) logit vector pair, from the definition."""
    t = [math.exp((a - c) / t_temp) for a, c in zip(teacher_logits.tolist(), center.tolist())]
    t = [x / sum(t) for x in t]
    s = [a / STUDENT_TEMP for a in student_logits.tolist()]
    log_z = math.log(sum(math.exp(x) for x in s))
    return -sum(ti * (si - log_z) for ti, si in zip(t, s))


def _reference(s_cls, s_local, s_patch, t_cls, t_patch, masks, center, center2, temp, temp2, lambda1, lambda2):
    student_views = list(torch.cat([s_cls, s_local]).view(G + L, B, K))
    teacher_views = t_cls.view(G, B, K)
    cls_total, pairs = 0.0, 0
    for q in range(G):
        for v in range(G + L):
            if v == q:
                continue
            cls_total += sum(_ce(teacher_views[q][b], center[0], temp, student_views[v][b]) for b in range(B)) / B
            pairs += 1
    assert pairs == G * (G + L - 1)
    patch_total = 0.0
    for q in range(G):
        per_image = []
        for b in range(B):
            m = masks[q][b].flatten()
            total = sum(_ce(t_patch[q * B + b, i], center2[0, 0], temp2, s_patch[q * B + b, i])
                        for i in range(N) if m[i])
            per_image.append(total / max(1, int(m.sum())))
        patch_total += sum(per_image) / B
    return lambda1 * cls_total / pairs, lambda2 * patch_total / G


@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_matches_explicit_formula(epoch: int) -> None:
    loss = _loss(lambda1=0.7, lambda2=1.3)
    s_cls, s_local, s_patch, t_cls, t_patch, masks = _inputs(epoch)
    loss.center.normal_()
    loss.center2.normal_()
    center, center2 = loss.center.clone(), loss.center2.clone()
    out = loss((s_cls, s_patch), (t_cls, t_patch), s_local, masks, epoch)
    ref_cls, ref_patch = _reference(s_cls, s_local, s_patch, t_cls, t_patch, masks, center, center2,
                                    loss.teacher_temp_schedule[epoch], loss.teacher_temp2_schedule[epoch], 0.7, 1.3)
    assert out["cls"].item() == pytest.approx(ref_cls, rel=1e-5)
    assert out["patch"].item() == pytest.approx(ref_patch, rel=1e-5)
    assert out["loss"].item() == pytest.approx(ref_cls + ref_patch, rel=1e-5)


def test_masked_rows_path_equals_official_layout() -> None:
    s_cls, s_local, s_patch, t_cls, t_patch, masks = _inputs(3)
    flat_mask = torch.cat([m.flatten(1) for m in masks])
    full, rows, rows_teacher = _loss(), _loss(), _loss()
    for module in (full, rows, rows_teacher):
        module.center.fill_(0.3)
        module.center2.fill_(-0.2)
    s_patch_full = s_patch.clone().requires_grad_()
    s_patch_rows = s_patch.clone().requires_grad_()
    out_full = full((s_cls, s_patch_full), (t_cls, t_patch), s_local, masks, 1)
    out_rows = rows((s_cls, s_patch_rows[flat_mask]), (t_cls, t_patch), s_local, flat_mask, 1)
    out_rows_teacher = rows_teacher((s_cls, s_patch[flat_mask]), (t_cls, t_patch[flat_mask]), s_local,
                                    torch.stack(masks).flatten(0, 1), 1, teacher_patch_mean=t_patch.mean(1))
    for key in ("cls", "patch", "loss"):
        assert torch.allclose(out_full[key], out_rows[key], rtol=1e-6, atol=0)
        assert torch.allclose(out_full[key], out_rows_teacher[key], rtol=1e-6, atol=0)
    for name in ("center", "center2"):
        assert torch.allclose(getattr(full, name), getattr(rows, name))
        assert torch.allclose(getattr(full, name), getattr(rows_teacher, name), atol=1e-7)
    out_full["patch"].backward()
    out_rows["patch"].backward()
    assert torch.allclose(s_patch_full.grad, s_patch_rows.grad, atol=1e-8)
    assert torch.all(s_patch_full.grad[~flat_mask] == 0)
    with pytest.raises(ValueError):
        rows((s_cls, s_patch[flat_mask]), (t_cls, t_patch[flat_mask]), s_local, flat_mask, 1)


def test_no_masked_patch_gives_zero_patch_loss() -> None:
    s_cls, s_local, s_patch, t_cls, t_patch, masks = _inputs(4)
    empty = [torch.zeros_like(m) for m in masks]
    out = _loss()((s_cls, s_patch), (t_cls, t_patch), s_local, empty, 0)
    assert out["patch"].item() == 0.0
    rows = s_patch[:0, 0].clone().requires_grad_()  # masked-rows path with M = 0
    out = _loss(nlcrops=0)((s_cls, rows), (t_cls, t_patch), None, empty, 0)
    assert out["patch"].item() == 0.0
    out["loss"].backward()
    assert rows.grad is not None and rows.grad.shape == (0, P)


def test_center_update_by_hand() -> None:
    loss = _loss(center_momentum=0.9, center_momentum2=0.9)
    loss.center.fill_(1.0)
    loss.center2.fill_(2.0)
    t_cls = torch.arange(G * B * K, dtype=torch.float32).view(G * B, K)
    t_patch = torch.arange(G * B * N * P, dtype=torch.float32).view(G * B, N, P)
    loss.update_center(t_cls, t_patch)
    expected_cls = 0.9 * 1.0 + 0.1 * t_cls.numpy().mean(axis=0)
    expected_patch = 0.9 * 2.0 + 0.1 * t_patch.numpy().mean(axis=1).mean(axis=0)
    assert loss.center.shape == (1, K) and loss.center2.shape == (1, 1, P)
    assert np.allclose(loss.center[0].numpy(), expected_cls)
    assert np.allclose(loss.center2[0, 0].numpy(), expected_patch)
    # token-mean input gives the same update
    other = _loss()
    other.center.fill_(1.0)
    other.center2.fill_(2.0)
    other.update_center(t_cls, t_patch.mean(1))
    assert torch.allclose(other.center2, loss.center2)


def test_forward_updates_center_after_loss() -> None:
    loss = _loss()
    s_cls, s_local, s_patch, t_cls, t_patch, masks = _inputs(5)
    before = _loss()((s_cls, s_patch), (t_cls, t_patch), s_local, masks, 0)
    out = loss((s_cls, s_patch), (t_cls, t_patch), s_local, masks, 0)
    assert torch.equal(out["loss"], before["loss"])  # computed with the old (zero) centres
    assert torch.allclose(loss.center, 0.1 * t_cls.mean(0, keepdim=True))
    assert torch.allclose(loss.center2, 0.1 * t_patch.mean(1).mean(0).view(1, 1, P))


def test_state_dict_names() -> None:
    assert set(_loss().state_dict()) == {"center", "center2"}


def test_temperature_schedules() -> None:
    loss = _loss(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp2=0.04, teacher_temp2=0.07,
                 warmup_teacher_temp_epochs=4, nepochs=10, mim_start_epoch=3)
    assert np.allclose(loss.teacher_temp_schedule, [0.04, 0.05, 0.06, 0.07] + [0.07] * 6)
    assert np.allclose(loss.teacher_temp2_schedule, [0.04] * 3 + [0.04, 0.05, 0.06, 0.07] + [0.07] * 3)
    assert len(_loss(mim_start_epoch=0).teacher_temp2_schedule) == 10
    assert np.allclose(teacher_temp_schedule(0.04, 0.07, 30, 100)[[0, 29, 30, 99]], [0.04, 0.07, 0.07, 0.07])


# -- patch-target ablations (paper App. E, Tab. 18) ---------------------------------------------------
def _toy_patch_loss(**kwargs) -> IBOTLoss:
    """1 global crop, 1 image of 2 tokens, P = 3 (only the patch term matters here)."""
    return IBOTLoss(out_dim=2, patch_out_dim=3, ngcrops=1, nlcrops=0, warmup_teacher_temp=0.04, teacher_temp=0.04,
                    warmup_teacher_temp2=0.07, teacher_temp2=0.07, warmup_teacher_temp_epochs=0, nepochs=1, **kwargs)


def test_hard_patch_targets_by_hand() -> None:
    """Hard targets = cross-entropy with the one-hot argmax of the centred teacher logits."""
    loss = _toy_patch_loss(patch_targets="hard")
    loss.center2.copy_(torch.tensor([0.0, 2.0, 0.0]).view(1, 1, 3))
    teacher = torch.tensor([[[1.0, 2.5, 0.0], [0.0, 0.0, 3.0]]])  # centred: [1, .5, 0] -> 0; [0, -2, 3] -> 2
    student = torch.tensor([[[0.1, 0.2, 0.3], [0.3, -0.1, 0.0]]])
    mask = torch.tensor([[True, True]])
    got = loss.patch_loss(student, teacher, mask, temp=0.07).item()

    def nll(logits, k):  # -log softmax(logits / 0.1)[k]
        z = [v / STUDENT_TEMP for v in logits]
        return math.log(sum(math.exp(v) for v in z)) - z[k]
    expected = (nll([0.1, 0.2, 0.3], 0) + nll([0.3, -0.1, 0.0], 2)) / 2  # mean over the image's 2 masked tokens
    assert got == pytest.approx(expected, rel=1e-6)
    # without the centre the first token's argmax moves to 1
    uncentred = _toy_patch_loss(patch_targets="hard", patch_centering=False)
    uncentred.center2.copy_(loss.center2)
    expected = (nll([0.1, 0.2, 0.3], 1) + nll([0.3, -0.1, 0.0], 2)) / 2
    assert uncentred.patch_loss(student, teacher, mask, temp=0.07).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="patch_targets"):
        _toy_patch_loss(patch_targets="onehot")


def test_patch_centering_off_equals_a_zero_centre() -> None:
    s_cls, s_local, s_patch, t_cls, t_patch, masks = _inputs(6)
    off, zero = _loss(patch_centering=False), _loss()
    off.center2.normal_()  # a centre that would matter, ignored by the loss ...
    off.center.copy_(torch.randn(1, K))
    zero.center.copy_(off.center)  # ... while zero's centre2 stays 0 ([CLS] centre equal in both)
    centre2_before = off.center2.clone()
    out_off = off((s_cls, s_patch), (t_cls, t_patch), s_local, masks, 1)
    out_zero = zero((s_cls, s_patch), (t_cls, t_patch), s_local, masks, 1)
    assert torch.allclose(out_off["patch"], out_zero["patch"], rtol=1e-6)
    assert torch.allclose(out_off["cls"], out_zero["cls"], rtol=1e-6)
    # ... and still updated (uniform checkpoints)
    assert torch.allclose(off.center2, 0.9 * centre2_before + 0.1 * t_patch.mean(1).mean(0).view(1, 1, P), atol=1e-6)


@pytest.mark.parametrize("momentum", [0.8, 0.99, 0.999])
def test_patch_center_momentum_by_hand(momentum: float) -> None:
    loss = _loss(center_momentum2=momentum)
    loss.center.fill_(1.0)
    loss.center2.fill_(2.0)
    t_cls = torch.arange(G * B * K, dtype=torch.float32).view(G * B, K)
    t_patch = torch.arange(G * B * N * P, dtype=torch.float32).view(G * B, N, P) / 100
    loss.update_center(t_cls, t_patch)
    assert np.allclose(loss.center2[0, 0].numpy(), momentum * 2.0 + (1 - momentum) * t_patch.numpy().mean(axis=(0, 1)),
                       atol=1e-6)
    assert np.allclose(loss.center[0].numpy(), 0.9 * 1.0 + 0.1 * t_cls.numpy().mean(axis=0))  # [CLS] m unchanged
