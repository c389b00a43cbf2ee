import numpy as np
import torch

from raydc.core.augment import random_erase, random_resized_crop, resize_center, to_float
from raydc.core.stream import _repeat_index, shuffled_batches, to_model_input, Augment


def test_full_crop_without_flip_is_identity():
    img = np.random.default_rng(0).integers(0, 255, (2, 16, 16, 1), dtype=np.uint8)
    x = to_float(img)
    u = np.tile([1 - 1e-9, 0.5, 0.5, 0.5, 0.9], (2, 1))  # scale 1, ratio 1, centred, no flip
    out = random_resized_crop(x, u, 16)
    assert torch.allclose(out, x, atol=1e-4)


def test_flip_mirrors():
    img = np.random.default_rng(0).integers(0, 255, (1, 16, 16, 1), dtype=np.uint8)
    x = to_float(img)
    u = np.array([[1 - 1e-9, 0.5, 0.5, 0.5, 0.1]])  # flip
    out = random_resized_crop(x, u, 16)
    assert torch.allclose(out, torch.flip(x, dims=[3]), atol=1e-4)


def test_resize_center_shapes():
    x = torch.randn(2, 3, 40, 60)
    assert resize_center(x, 32).shape == (2, 3, 32, 32)
    assert resize_center(torch.randn(1, 1, 28, 28), 28).shape == (1, 1, 28, 28)


def test_augmentation_depends_on_id_not_on_batch_position():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (6, 28, 28, 1), dtype=np.uint8)
    ids = np.arange(6) + 100
    rep = np.zeros(6, np.int64)
    aug = Augment(28, scale_min=0.3)
    a = to_model_input(ids, rep, imgs, seed=1, epoch=2, augment=aug, size=28)
    perm = np.array([5, 3, 1, 0, 2, 4])
    b = to_model_input(ids[perm], rep[perm], imgs[perm], seed=1, epoch=2, augment=aug, size=28)
    assert torch.allclose(a[perm], b, atol=1e-6)
    c = to_model_input(ids, rep, imgs, seed=1, epoch=3, augment=aug, size=28)
    assert not torch.allclose(a, c)


def test_random_erasing_sets_one_rectangle_of_the_drawn_area_to_the_background():
    img = np.full((3, 28, 28, 1), 255, np.uint8)
    img[:, 0, 0] = 0  # the background: one dark pixel in a corner the rectangles below do not reach
    x = to_float(img)
    # applied with the largest area, square, centred; not applied (u0 >= p); applied with the smallest area
    u = np.array([[0.0, 1.0, 0.5, 0.5, 0.5], [0.7, 1.0, 0.5, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5, 0.5]])
    out = random_erase(x, u, p=0.5)
    erased = (out != x).squeeze(1)
    assert abs(erased[0].float().mean().item() - 0.33) < 0.02 and abs(erased[2].float().mean().item() - 0.02) < 0.01
    assert not erased[1].any()
    assert torch.all(out[0][:, erased[0]] == x[0].min())  # filled with the image's own background
    rows, cols = torch.nonzero(erased[0], as_tuple=True)  # one rectangle: its bounding box is all erased
    assert erased[0][rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


def test_erasing_is_drawn_per_image_id_and_spares_about_one_minus_p_of_the_images():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (64, 28, 28, 1), dtype=np.uint8)
    ids, rep = np.arange(64) + 100, np.zeros(64, np.int64)
    plain = to_model_input(ids, rep, imgs, seed=1, epoch=2, augment=Augment(28, kind="affine"), size=28)
    aug = Augment(28, kind="affine", erase=0.5)
    a = to_model_input(ids, rep, imgs, seed=1, epoch=2, augment=aug, size=28)
    perm = rng.permutation(64)
    b = to_model_input(ids[perm], rep[perm], imgs[perm], seed=1, epoch=2, augment=aug, size=28)
    assert torch.equal(a[perm], b)  # the same image gets the same rectangle wherever it is streamed
    changed = (a != plain).flatten(1).any(1)
    assert 16 < int(changed.sum()) < 48  # about half the images, the rest as without erasing


def test_repeat_index():
    assert _repeat_index(np.array([2, 0, 3])).tolist() == [0, 1, 0, 1, 2]


def test_shuffled_batches_fixed_size_and_deterministic():
    def rows():
        for s in range(0, 1000, 100):
            ids = np.arange(s, s + 100)
            image = np.zeros((100, 2, 2, 1), np.uint8) + (ids % 255).astype(np.uint8)[:, None, None, None]
            yield {"id": ids, "image": image}

    def run():
        return [b.ids.copy() for b in shuffled_batches(rows(), batch_size=64, seed=3, epoch=1, buffer_batches=2)]

    a, b = run(), run()
    assert all(len(x) == 64 for x in a)
    assert len(a) == 1000 // 64
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    seen = np.concatenate(a)
    assert len(np.unique(seen)) == len(seen)  # no row twice without repeats
    assert not np.array_equal(np.sort(seen[:64]), seen[:64])  # shuffled


def test_shuffled_batches_with_repeats():
    def rows():  # ids are any int64; rows (the targets' key) travel with them, and so does each row's target
        yield {"id": np.arange(100) * -7919, "row": np.arange(100), "image": np.zeros((100, 2, 2, 1), np.uint8),
               "target": np.arange(100) * 10}

    def counts(r, u):
        return np.where(r["row"] < 50, 2, 0)

    out = list(shuffled_batches(rows(), batch_size=10, seed=0, epoch=0, repeats=counts))
    rows_ = np.concatenate([b.rows for b in out])
    reps = np.concatenate([b.copy for b in out])
    assert len(rows_) == 100 and rows_.max() < 50
    assert sorted(zip(rows_.tolist(), reps.tolist())) == [(i, r) for i in range(50) for r in range(2)]
    for b in out:
        assert np.array_equal(b.ids, b.rows * -7919) and np.array_equal(b.target, b.rows * 10)
