"""Boundary Patch Refinement (BPR; Tang et al., "Look Closer to Segment Better", CVPR 2021),
adapted to road masks.

Within each window: the boundary of the road mask is found, ``box`` x ``box`` boxes are placed
along it and thinned by non-maximum suppression, and a small segmentation network re-segments
each box from the image patch and the mask patch (upsampled to ``input_size``). Its road
probabilities are resized back and pasted over the window, averaging where boxes overlap;
pixels no box covers keep their value. Everything is batched tensor code (torchvision's NMS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from geoprn.models.header import reads_image, recorded_cut_off

BOX = 64
"""Side of a boundary box, in pixels (the paper's 64)."""
INPUT_SIZE = 128
"""Boxes are upsampled to this side before the network sees them (the paper's 128)."""
NMS_IOU_TRAIN, NMS_IOU_INFER = 0.25, 0.55
"""NMS IoU thresholds: sparse boxes for training, dense ones at inference (the paper's)."""
STRIDE = 8
"""Candidate boxes are centred on the cells of this grid that hold boundary pixels."""


def boundary_map(mask: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3 x 3 neighbourhood holds both road and background.

    The window edges are replicate-padded: a road leaving the window is not a boundary there.

    Args:
        mask: (N, H, W) bool road mask.

    Returns:
        (N, H, W) bool boundary.
    """
    m = F.pad(mask[:, None].float(), (1, 1, 1, 1), mode="replicate")
    return (F.max_pool2d(m, 3, 1) != -F.max_pool2d(-m, 3, 1))[:, 0]


def box_counts(boxes: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """How many boxes cover each pixel: (N, H, W) int32 from (K, 5) boxes ``n, y0, x0, y1, x1``."""
    n, y0, x0, y1, x1 = boxes.long().unbind(1)
    diff = torch.zeros(
        (shape[0], shape[1] + 1, shape[2] + 1), dtype=torch.int32, device=boxes.device
    )
    ones = torch.ones_like(n, dtype=torch.int32)
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        diff.index_put_((n, ys, xs), sign * ones, accumulate=True)
    return diff.cumsum(1).cumsum(2)[:, : shape[1], : shape[2]].int()


def boundary_boxes(
    boundary: torch.Tensor, box: int = BOX, nms_iou: float = NMS_IOU_INFER, stride: int = STRIDE
) -> torch.Tensor:
    """Boxes along a boundary, scored by the boundary pixels they hold, thinned by NMS.

    Candidates are centred on the ``stride`` grid cells that hold boundary pixels, shifted to
    lie inside the window. NMS keeps the strongest boxes; candidates whose boundary pixels are
    left uncovered then compete again, until every boundary pixel lies in a box.

    Args:
        boundary: (N, H, W) bool, with H, W >= ``box``.
        box: box side.
        nms_iou: boxes overlapping a kept one by more than this are dropped.
        stride: spacing of candidate centres.

    Returns:
        (K, 5) int64 boxes ``(n, y0, x0, y1, x1)``: window index and half-open pixel bounds,
        sorted by window, then row, then column.
    """
    n_win, height, width = boundary.shape
    if height < box or width < box:
        raise ValueError(f"windows of {height} x {width} px cannot hold {box} px boxes")
    integral = F.pad(boundary.int().cumsum(1).cumsum(2), (1, 0, 1, 0))
    kept = boundary.new_zeros((0, 5), dtype=torch.long)
    uncovered = boundary
    while True:
        cells = F.max_pool2d(uncovered[:, None].float(), stride, stride, ceil_mode=True)[:, 0]
        n, cy, cx = torch.nonzero(cells > 0, as_tuple=True)
        if len(n) == 0:
            return kept
        y0 = (cy * stride + stride // 2 - box // 2).clamp(0, height - box)
        x0 = (cx * stride + stride // 2 - box // 2).clamp(0, width - box)
        y1, x1 = y0 + box, x0 + box
        score = (
            integral[n, y1, x1] - integral[n, y0, x1] - integral[n, y1, x0] + integral[n, y0, x0]
        )
        coords = torch.stack([x0, y0, x1, y1], 1).float()
        keep = batched_nms(coords, score.float(), n, nms_iou)
        kept = torch.cat([kept, torch.stack([n, y0, x0, y1, x1], 1)[keep]])
        uncovered = boundary & (box_counts(kept, boundary.shape) == 0)
        order = torch.argsort((kept[:, 0] * height + kept[:, 1]) * width + kept[:, 2])
        kept = kept[order]


def crop_boxes(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The (K, C, box, box) patches of (N, C, H, W) ``x`` under ``boxes`` (all the same size)."""
    side = int(boxes[0, 3] - boxes[0, 1])
    offsets = torch.arange(side, device=x.device)
    rows = (boxes[:, 1, None] + offsets)[:, :, None]
    cols = (boxes[:, 2, None] + offsets)[:, None, :]
    return x[boxes[:, 0, None, None], :, rows, cols].permute(0, 3, 1, 2)


def paste_boxes(probs: torch.Tensor, boxes: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Paste (K, box, box) patches into (N, H, W) ``probs``, averaging where boxes overlap;
    pixels no box covers keep their value.

    Patches are added one by one in the boxes' order: the float sums, and so the result, are
    the same whichever other windows share the batch.
    """
    total = torch.zeros_like(probs, dtype=torch.float32)
    for (n, y0, x0, y1, x1), patch in zip(boxes.tolist(), patches.float(), strict=True):
        total[n, y0:y1, x0:x1] += patch
    count = box_counts(boxes, probs.shape)
    return torch.where(count > 0, total / count.clamp(min=1), probs.float()).to(probs.dtype)


def recentred(probs: torch.Tensor, at: float) -> torch.Tensor:
    """Probabilities whose cut-off ``at`` moves to 0.5: ``sigmoid(logit(p) - logit(at))``.

    BPR places its boxes on, and re-segments, the mask ``probs > 0.5``, and its own outputs
    are cut at 0.5; a previous stage whose recorded cut-off is not 0.5 is recentred first, so
    the mask BPR sees is the mask that stage makes, and one cut-off holds across the window.
    The order of the probabilities is kept; ``at == 0.5`` returns ``probs`` unchanged.
    """
    if at == 0.5:
        return probs
    shift = torch.logit(torch.tensor(at, dtype=torch.float64)).item()
    return torch.sigmoid(torch.logit(probs.float(), eps=1e-6) - shift).to(probs.dtype)


def upsample(patches: torch.Tensor, size: int) -> torch.Tensor:
    """(K, C, s, s) patches resized to (K, C, size, size), bilinearly, as the network sees them."""
    return F.interpolate(patches.float(), size=size, mode="bilinear")


class BoundaryRefiner(nn.Module):
    """A window-level refiner: road probabilities (and the image) in, refined probabilities out.

    Input: (N, 1 + C, H, W), the road probability of the previous stage in channel 0 and the
    image's C raw bands after it. With ``before`` (a PRN), channel 0 is first refined by it.
    The previous stage's probabilities are :func:`recentred` at its cut-off (``before``'s
    recorded threshold; ``cut_off`` without ``before``), so the output is cut at 0.5.
    """

    def __init__(
        self,
        patch_model: nn.Module,
        before: nn.Module | None = None,
        box: int = BOX,
        input_size: int = INPUT_SIZE,
        nms_iou: float = NMS_IOU_INFER,
        patch_batch: int = 64,
        cut_off: float = 0.5,
    ):
        super().__init__()
        self.patch_model = patch_model
        self.before = before
        self.box, self.input_size, self.nms_iou = box, input_size, nms_iou
        self.patch_batch = patch_batch
        self.cut_off = cut_off if before is None else recorded_cut_off(before.geoprn_meta)
        self.boxes_seen = 0

    def refine_patches(self, patches: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """Road probabilities (K, box, box) of (K, C + 1, box, box) image + mask patches.

        Each window's patches go through the network in batches of their own, so a window's
        result does not depend on the windows batched with it (float rounding included).
        """
        out = []
        per_window = torch.unique_consecutive(windows, return_counts=True)[1].tolist()
        chunks = [c for w in patches.split(per_window) for c in w.split(self.patch_batch)]
        for chunk in chunks:
            up = upsample(chunk, self.input_size).contiguous(memory_format=torch.channels_last)
            probs = self.patch_model(up)
            out.append(F.interpolate(probs.float(), size=self.box, mode="area")[:, 0])
        return torch.cat(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs, image = x[:, :1], x[:, 1:]
        if self.before is not None:  # the same layout as when it runs alone: the same floats
            before_input = x if reads_image(self.before.geoprn_meta) else probs
            probs = self.before(before_input.contiguous(memory_format=torch.channels_last))
        probs = recentred(probs.float(), self.cut_off)
        mask = probs[:, 0] > 0.5
        boxes = boundary_boxes(boundary_map(mask), self.box, self.nms_iou)
        self.boxes_seen += len(boxes)
        if len(boxes) == 0:
            return probs
        patches = crop_boxes(torch.cat([image.float(), mask[:, None].float()], 1), boxes)
        refined = self.refine_patches(patches, boxes[:, 0])
        return paste_boxes(probs[:, 0], boxes, refined)[:, None]
