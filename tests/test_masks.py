"""Token-grid layout and patch perturbation (masks.py): hand-computed morphology, window-local shuffles, placement."""
import pytest
import torch

from minidit.masks import augment_mask, bbox, box_offset, dilate, erode, local_shuffle, pixels_to_tokens, translate


def grid(h, w, *cells):
    m = torch.zeros(h, w, dtype=torch.bool)
    for r, c in cells:
        m[r, c] = True
    return m


def test_dilation_hand_computed():
    out = dilate(grid(7, 7, (3, 3)))                    # one token -> its 5x5 neighbourhood
    expected = torch.zeros(7, 7, dtype=torch.bool)
    expected[1:6, 1:6] = True
    assert torch.equal(out, expected)
    out = dilate(grid(6, 6, (0, 5)))                    # at a corner: clipped by the grid
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[0:3, 3:6] = True
    assert torch.equal(out, expected)
    assert torch.equal(dilate(torch.zeros(4, 4, dtype=torch.bool)), torch.zeros(4, 4, dtype=torch.bool))


def test_erosion_hand_computed():
    block = torch.zeros(7, 7, dtype=torch.bool)
    block[1:6, 1:6] = True                             # a 5x5 block erodes to its centre
    assert torch.equal(erode(block), grid(7, 7, (3, 3)))
    block = torch.zeros(7, 8, dtype=torch.bool)
    block[1:6, 1:7] = True                             # 5x6 -> the two centre tokens
    assert torch.equal(erode(block), grid(7, 8, (3, 3), (3, 4)))
    assert erode(torch.ones(5, 5, dtype=torch.bool)).all()        # outside the grid does not erode
    inner = grid(5, 5, *[(r, c) for r in (1, 2, 3) for c in (1, 2, 3)])
    assert torch.equal(erode(torch.ones(5, 5, dtype=torch.bool), 3, from_border=True), inner)  # it does here
    edge = torch.zeros(6, 6, dtype=torch.bool)
    edge[:, :3] = True                                 # touches the left border: eaten only from the right
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[:, :1] = True
    assert torch.equal(erode(edge), expected)


def test_augment_is_seeded_and_falls_back_for_thin_subjects():
    m = torch.zeros(12, 12, dtype=torch.bool)
    m[2:10, 3:9] = True
    ops = set()
    for seed in range(8):
        a, op = augment_mask(m, torch.Generator().manual_seed(seed))
        b, op2 = augment_mask(m, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b) and op == op2
        assert torch.equal(a, dilate(m) if op == "dilate" else erode(m))
        ops.add(op)
    assert ops == {"dilate", "erode"}
    thin = grid(8, 8, (4, 2), (4, 3), (4, 4))
    for seed in range(8):
        out, op = augment_mask(thin, torch.Generator().manual_seed(seed))
        assert op in ("dilate", "keep")
        if op == "keep":
            assert torch.equal(out, thin)


@pytest.mark.parametrize("h,w", [(8, 8), (7, 10), (9, 9)])
def test_local_shuffle_is_a_permutation_inside_3x3_windows(h, w):
    mask = torch.rand(h, w, generator=torch.Generator().manual_seed(h * w)) > 0.35
    perm = local_shuffle(mask, torch.Generator().manual_seed(5))
    flat = mask.flatten()
    idx = flat.nonzero().flatten()
    assert torch.equal(torch.sort(perm[idx]).values, idx)            # bijection on the subject: multiset kept
    assert torch.equal(perm[~flat], torch.arange(h * w)[~flat])       # background untouched
    rows, cols = torch.arange(h * w) // w, torch.arange(h * w) % w
    assert torch.equal(rows // 3, (perm // w) // 3) and torch.equal(cols // 3, (perm % w) // 3)
    values = torch.randn(h * w, 5)                                    # tokens moved, multiset kept
    moved = values[perm[idx]]
    assert torch.allclose(moved.sum(0), values[idx].sum(0), atol=1e-5)
    again = local_shuffle(mask, torch.Generator().manual_seed(5))
    assert torch.equal(perm, again)                                   # reproducible from the seed
    other = local_shuffle(mask, torch.Generator().manual_seed(6))
    assert not torch.equal(perm, other)
    assert (perm[idx] != idx).any()                                   # it does shuffle


def test_translate_moves_exactly_the_masked_tokens():
    m = grid(6, 8, (1, 1), (1, 2), (2, 1))
    t = translate(m, 2, 3)
    assert torch.equal(t, grid(6, 8, (3, 4), (3, 5), (4, 4)))
    with pytest.raises(ValueError, match="outside"):
        translate(m, 0, -2)
    with pytest.raises(ValueError, match="outside"):
        translate(m, 5, 0)


def test_box_offset_and_pixel_offsets():
    m = torch.zeros(8, 8, dtype=torch.bool)
    m[1:3, 1:4] = True                                 # 2x3 tokens = 48x32 px
    assert bbox(m) == (1, 1, 3, 4)
    dy, dx = box_offset(m, (64, 64, 64, 64))           # box tokens rows/cols 4..7: centred -> rows 5-6, cols 4/5-6
    assert torch.equal(translate(m, dy, dx).nonzero()[:, 0].unique(), torch.tensor([5, 6]))
    assert (dy, dx) == (4, 3)
    with pytest.raises(ValueError, match="does not fit"):
        box_offset(m, (0, 0, 32, 32))
    with pytest.raises(ValueError, match="outside"):
        box_offset(m, (100, 0, 64, 64))
    assert pixels_to_tokens(48) == 3 and pixels_to_tokens(-32) == -2
    with pytest.raises(ValueError, match="multiple of 16"):
        pixels_to_tokens(20)
