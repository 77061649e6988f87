"""The built-in synthetic dataset: deterministic, dense where promised, touching but not piled-up cells."""
import numpy as np
import pytest

from datasets.synthetic import SyntheticCells, SyntheticSpec, render_image
from utils.label_images import label_image_to_instances

SPEC = SyntheticSpec(num_images=16, split="val")


def touching_pairs(label_image: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of instance ids that share a 4-neighbour edge."""
    pairs = set()
    for a, b in ((label_image[:, 1:], label_image[:, :-1]), (label_image[1:], label_image[:-1])):
        edge = (a != b) & (a > 0) & (b > 0)
        pairs |= {(int(min(x, y)), int(max(x, y))) for x, y in zip(a[edge], b[edge])}
    return pairs


def test_same_spec_renders_the_same_image_and_splits_differ():
    first, second = render_image(SPEC, 3), render_image(SPEC, 3)
    for x, y in zip(first, second):
        assert np.array_equal(x, y)
    other_split = render_image(SyntheticSpec(num_images=16, split="train"), 3)
    assert not np.array_equal(first[0], other_split[0])


@pytest.mark.parametrize("index", [7, 15])
def test_dense_images_hold_hundreds_of_touching_cells(index):
    image, label_image, labels = render_image(SPEC, index)
    assert image.shape == (256, 256) and image.dtype == np.uint8
    assert len(labels) >= 200, "the dense case needs several hundred instances"
    assert set(np.unique(label_image)) == set(range(len(labels) + 1))
    touching = touching_pairs(label_image)
    in_contact = {k for pair in touching for k in pair}
    assert len(touching) >= 50
    assert len(in_contact) < len(labels), "some cells must also stand alone"
    assert set(labels.tolist()) == {1, 2}


def test_cells_are_not_buried_under_others():
    # Placement caps how much of a new cell may cover others, so nearly every instance keeps
    # most of a cell's area visible: no crescent slivers that no annotator would draw.
    _, label_image, labels = render_image(SPEC, 7)
    areas = np.bincount(label_image.ravel())[1:]
    assert areas.min() >= SPEC.min_visible_px
    # Dense cells have radius ≥ 4.5 px (full area ≈ 64 px or more); piling them up at random
    # leaves a tenth of them under ~50 px.
    assert np.percentile(areas, 10) >= 60


def test_elongated_class_is_elongated():
    aspect = {1: [], 2: []}
    for index in range(6):
        _, label_image, labels = render_image(SPEC, index)
        for mask, cls in zip(label_image_to_instances(label_image)[0], labels):
            ys, xs = np.nonzero(mask)
            if len(xs) < 40:
                continue
            eig = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(float)))
            aspect[int(cls)].append(np.sqrt(eig[1] / max(eig[0], 1e-6)))
    assert np.median(aspect[2]) > np.median(aspect[1]) + 0.4


def test_dataset_targets_match_the_rendered_labels():
    dataset = SyntheticCells(SyntheticSpec(num_images=2, height=96, width=96, split="train"))
    image, target = dataset[1]
    _, label_image, labels = render_image(dataset.spec, 1)
    assert target["masks"].shape == (len(labels), 96, 96)
    assert np.array_equal(target["labels"].numpy(), labels)
    boxes = target["boxes"].numpy()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    gt = dataset.coco_gt()
    assert len([a for a in gt["annotations"] if a["image_id"] == 1]) == len(labels)
