"""The grid adapter: pixels -> region-like features + boxes that tile the image."""

import pytest
import torch

from vlcompress.models.visual_adapter import GridRegionAdapter, grid_boxes, grid_side


def test_boxes_are_normalised_and_tile_the_image():
    boxes = grid_boxes(3, 5)
    assert boxes.shape == (15, 4)
    assert boxes.min() >= 0 and boxes.max() <= 1
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    # The cells' areas add up to the unit square and no two cells overlap: they tile it.
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert area.sum().item() == pytest.approx(1.0)
    x1 = torch.maximum(boxes[:, None, 0], boxes[None, :, 0])
    x2 = torch.minimum(boxes[:, None, 2], boxes[None, :, 2])
    y1 = torch.maximum(boxes[:, None, 1], boxes[None, :, 1])
    y2 = torch.minimum(boxes[:, None, 3], boxes[None, :, 3])
    overlap = (x2 - x1).clamp_min(0) * (y2 - y1).clamp_min(0)
    assert torch.allclose(overlap, torch.diag(area), atol=1e-7)
    # Row-major: the second cell is to the right of the first, cell 5 starts the second row.
    assert boxes[1, 0] == boxes[0, 2] and boxes[5, 1] == boxes[0, 3] and boxes[5, 0] == 0


def test_grid_side_follows_pooling_and_strided_convs():
    assert grid_side(64, 4) == 4
    assert grid_side(65, 3, pool=True) == 8 and grid_side(65, 3, pool=False) == 9
    with pytest.raises(ValueError, match="fewer adapter channels"):
        grid_side(8, 4)


def test_adapter_cells_follow_the_image_content():
    torch.manual_seed(0)
    adapter = GridRegionAdapter(24, channels=(4, 8), context_layers=0, image_size=16).eval()
    assert adapter.num_regions == 16
    pixels = torch.rand(2, 3, 16, 16)
    feats, boxes = adapter(pixels)
    assert feats.shape == (2, 16, 24) and boxes.shape == (2, 16, 4)
    assert torch.equal(boxes[0], boxes[1]) and torch.equal(boxes[0], grid_boxes(4, 4))
    # Without context convs a cell sees only the neighbourhood of its 4x4 patch: changing the
    # top-left patch changes region 0 (box [0, 0, .25, .25]) and leaves the far corner alone.
    changed = pixels.clone()
    changed[:, :, :4, :4] = 1 - changed[:, :, :4, :4]
    new, _ = adapter(changed)
    assert not torch.allclose(new[:, 0], feats[:, 0])
    torch.testing.assert_close(new[:, 15], feats[:, 15])
    feats.sum().backward()
    assert all(p.grad is not None for p in adapter.parameters())


def test_adapter_refuses_wrong_input_with_the_fix():
    adapter = GridRegionAdapter(8, channels=(4,), image_size=8)
    with pytest.raises(ValueError, match="set the model's image_size option to 16"):
        adapter(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"expects pixels \(B, 3, H, W\)"):
        adapter(torch.rand(1, 5, 8))
    with pytest.raises(ValueError, match="positive feature_dim"):
        GridRegionAdapter(0)
