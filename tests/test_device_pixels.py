"""A GPU segmenter's pixel work on the device (serve_app.models.pil_resize, serve_app.models.device_masks): run here
on the CPU through the same torch code, it must give Pillow's resize byte for byte, `SamPredictor`'s masks pixel
for pixel, and RLE equal to the host encoder's from run starts alone."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

from serve_app.masks.encode import POLYGONS, RLE, encode_masks, polygons_of, rle_of
from serve_app.masks.rle import MaskRuns, mask_to_rle, runs_to_rle
from serve_app.models import device_masks
from serve_app.models.device_masks import runs_on_device, upsample_on_device
from serve_app.models.mask_upsampling import upsample_masks
from serve_app.models.messages import Masks, SegmentationRequest
from serve_app.models.pil_resize import resize_like_pil
from serve_app.models.segmenter import SamSegmenter
from tests.imaging import pattern
from tests.loopback import assert_matches_sam_predictor

# up and down, odd, extreme aspect ratios, a 12-megapixel photo, one pixel, already the encoder's size
RESIZES = [((480, 640), (768, 1024)), ((3, 5), (7, 11)), ((1000, 700), (1024, 717)), ((2000, 3000), (683, 1024)),
           ((1, 1), (1024, 1024)), ((37, 1500), (25, 1024)), ((1024, 768), (1024, 768)), ((999, 1001), (1022, 1024)),
           ((3024, 4032), (768, 1024)), ((17, 4), (1024, 241)), ((4, 17), (3, 1))]


def photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """Noise on gradients: every byte value, sharp and smooth neighbourhoods."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 160, width)[None, :, None] + np.linspace(0, 90, height)[:, None, None]
    return np.clip(ramp + rng.integers(-60, 60, (height, width, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size, target", RESIZES)
def test_resize_is_pillows_byte_for_byte(size, target):
    image = photo_like(*size, seed=sum(size))
    expected = np.array(Image.fromarray(image).resize(target[::-1], Image.BILINEAR))
    assert np.array_equal(resize_like_pil(torch.as_tensor(image), target).numpy(), expected)


def test_resize_is_pillows_for_any_sizes():
    """Small random sizes both ways: covers which pass Pillow runs first (the order changes the rounding)."""
    rng = np.random.default_rng(5)
    for _ in range(150):
        (height, width), target = rng.integers(1, 90, 2), tuple(int(n) for n in rng.integers(1, 90, 2))
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected = np.array(Image.fromarray(image).resize(target[::-1], Image.BILINEAR))
        assert np.array_equal(resize_like_pil(torch.as_tensor(image), target).numpy(), expected), (image.shape, target)


@pytest.mark.parametrize("version, expected", [((11, 3), [False, False, False]), ((12, 2), [False, True, False]),
                                               ((13, 0), [True, True, False])])
def test_the_pass_order_follows_pillows_version(monkeypatch, version, expected):
    from serve_app.models import pil_resize

    monkeypatch.setattr(pil_resize, "_pillow_version", lambda: version)
    # much shorter, narrower; 200 times taller than wide, shrinking; the width shrinking most
    cases = [(1000, 800, 300, 700), (2000, 10, 1024, 5), (500, 900, 480, 400)]
    assert [pil_resize._vertical_first(*case) for case in cases] == expected


def test_resize_is_segment_anythings_for_its_longest_side():
    transform = ResizeLongestSide(1024)
    for height, width in [(480, 640), (333, 517), (1200, 90), (1, 3)]:
        image = photo_like(height, width, seed=height)
        target = transform.get_preprocess_shape(height, width, 1024)
        assert np.array_equal(resize_like_pil(torch.as_tensor(image), target).numpy(), transform.apply_image(image))


def test_resize_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="uint8"):
        resize_like_pil(torch.zeros(4, 4, 3), (2, 2))
    with pytest.raises(ValueError, match="uint8"):
        resize_like_pil(torch.zeros(4, 4, dtype=torch.uint8), (2, 2))
    with pytest.raises(ValueError, match="0×2"):
        resize_like_pil(torch.zeros(4, 4, 3, dtype=torch.uint8), (0, 2))


def masks_with_edges() -> np.ndarray:
    """Empty, full, one pixel at each end, stripes, noise, and runs longer than one RLE record holds."""
    rng = np.random.default_rng(3)
    masks = np.zeros((8, 300, 300), bool)
    masks[1] = True
    masks[2, 0, 0] = True
    masks[3, -1, -1] = True
    masks[4, :, ::2] = True
    masks[5] = rng.random((300, 300)) > 0.5
    masks[6, 150:] = True
    masks[7, 10:200, 20:40] = True
    return masks


def test_runs_give_the_host_encoders_bytes():
    masks = masks_with_edges()
    runs = runs_on_device(torch.as_tensor(masks))
    assert [r.size for r in runs] == [300 * 300] * len(masks)
    for mask, found in zip(masks, runs):
        assert bool(found.first) == bool(mask.flat[0])
        assert np.array_equal(runs_to_rle(found), mask_to_rle(mask))
    assert len(runs[0].changes) == len(runs[1].changes) == 0 and len(runs[4].changes) == 300 * 300 - 1


def test_runs_of_nothing():
    assert runs_on_device(torch.zeros((0, 5, 5), dtype=torch.bool)) == []
    [empty] = runs_on_device(torch.zeros((1, 0, 7), dtype=torch.bool))
    assert np.array_equal(runs_to_rle(empty), mask_to_rle(np.zeros((0, 7), bool)))


def test_device_up_sampling_is_sams_and_bounded_per_chunk(monkeypatch):
    """The same masks in one chunk or one mask at a time (the floats held at once are bounded), and equal to the
    windowed host path wherever SAM's logit is not within float rounding of the threshold."""
    rng = torch.Generator().manual_seed(0)
    low_res = torch.randn(5, 256, 256, generator=rng) * 4
    original, input_size = (480, 640), (768, 1024)
    whole = upsample_on_device(low_res, input_size, original)
    monkeypatch.setattr(device_masks, "_CHUNK_FLOATS", 1)
    assert torch.equal(upsample_on_device(low_res, input_size, original), whole)
    host = upsample_masks(low_res, input_size, original)
    assert (host != whole.numpy()).mean() < 1e-4


@pytest.fixture(scope="module")
def on_device(tiny_models):
    return SamSegmenter.load(str(tiny_models["sam"]), device="cpu"), \
        SamSegmenter(SamSegmenter.load(str(tiny_models["sam"]), device="cpu").sam, torch.device("cpu"),
                     pixels_on_device=True)


def test_masks_made_on_the_device_equal_sam_predictor(on_device):
    host, device = on_device
    images = [pattern(240, 320, seed=1), pattern(320, 180, seed=2), pattern(12, 20, seed=3)]
    boxes = [np.array([[10, 20, 200, 180], [0, 0, 320, 240]], np.float32), np.array([[30, 40, 150, 300]], np.float32),
             np.array([[1, 1, 15, 10]], np.float32)]
    results = device.segment([SegmentationRequest(i, b) for i, b in zip(images, boxes)])
    assert_matches_sam_predictor(device.sam, images, boxes, results)
    for mine, theirs in zip(results, host.segment([SegmentationRequest(i, b) for i, b in zip(images, boxes)])):
        assert np.array_equal(mine.masks, theirs.masks) and np.array_equal(mine.scores, theirs.scores)


def test_rle_alone_comes_back_as_runs_and_encodes_to_the_same_bytes(on_device):
    _, device = on_device
    image, boxes = pattern(240, 320, seed=4), np.array([[10, 20, 200, 180], [50, 60, 90, 100]], np.float32)
    [pixels] = device.segment([SegmentationRequest(image, boxes)])
    [runs] = device.segment([SegmentationRequest(image, boxes, encodings=(RLE,))])
    assert runs.masks.shape == (2, 0, 0) and len(runs.runs) == 2
    assert np.array_equal(runs.scores, pixels.scores)
    encoded = encode_masks(pickle.loads(pickle.dumps(runs)), (RLE,))  # as it leaves the replica
    assert encoded.runs is None and encoded.masks.shape == (2, 0, 0)
    assert [r.tolist() for r in encoded.rle] == [mask_to_rle(m).tolist() for m in pixels.masks]
    with pytest.raises(ValueError, match="polygons need pixel masks"):
        polygons_of(runs, 0, 1.0)


@pytest.mark.parametrize("copy_every_pixels", [1 << 27, 1])  # one copy for the batch; a copy after every image
def test_a_batch_of_images_comes_back_in_order_whenever_it_is_copied(on_device, monkeypatch, copy_every_pixels):
    monkeypatch.setattr(device_masks, "HOST_COPY_PIXELS", copy_every_pixels)
    _, device = on_device
    images = [pattern(240, 320, seed=6), pattern(31, 17, seed=7), pattern(320, 180, seed=8), pattern(50, 60, seed=9)]
    boxes = [np.array([[10, 20, 200, 180], [0, 0, 320, 240], [5, 5, 6, 6]], np.float32), np.zeros((0, 4), np.float32),
             np.array([[3, 4, 15, 30]], np.float32), np.array([[0, 0, 60, 50], [10, 10, 40, 40]], np.float32)]
    pixels = device.segment([SegmentationRequest(i, b) for i, b in zip(images, boxes)])
    runs = device.segment([SegmentationRequest(i, b, encodings=(RLE,)) for i, b in zip(images, boxes)])
    assert [r.masks.shape for r in runs] == [(3, 0, 0), (0, 31, 17), (1, 0, 0), (2, 0, 0)]
    for mine, theirs in zip(runs, pixels):
        assert np.array_equal(mine.scores, theirs.scores)
        assert [rle_of(mine, n).tolist() for n in range(len(mine.scores))] == \
            [mask_to_rle(mask).tolist() for mask in theirs.masks]


def test_polygons_keep_the_pixels_and_clicks_work_on_the_device(on_device):
    host, device = on_device
    image = pattern(200, 260, seed=5)
    box = np.array([[20, 30, 180, 150]], np.float32)
    [both] = device.segment([SegmentationRequest(image, box, encodings=(RLE, POLYGONS))])
    assert both.runs is None and both.masks.shape == (1, 200, 260)
    encoded = encode_masks(both, (RLE, POLYGONS))
    assert encoded.rle[0].tolist() == mask_to_rle(both.masks[0]).tolist() and encoded.polygons is not None
    click = dict(points=np.array([[100, 90]], np.float32), point_labels=np.array([1]))
    for encodings in ((), (RLE,)):
        no_boxes = np.zeros((0, 4), np.float32)
        [mine] = device.segment([SegmentationRequest(image, no_boxes, encodings=encodings, **click)])
        [theirs] = host.segment([SegmentationRequest(image, np.zeros((0, 4), np.float32), **click)])
        assert np.array_equal(rle_of(mine, 0), mask_to_rle(theirs.masks[0]))


def test_runs_survive_the_trip_between_processes():
    runs = MaskRuns(np.array([3, 9], np.int32), True, 12)
    back = pickle.loads(pickle.dumps(Masks(masks=np.zeros((1, 0, 0), bool), scores=np.ones(1, np.float32),
                                           runs=[runs])))
    assert np.array_equal(rle_of(back, 0), mask_to_rle(np.array([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], bool)))


def test_the_benchmark_times_both_sides_of_the_same_work(on_device):
    """benchmarks.segmenter_pixels, which a GPU run uses to say what moved off the replica's CPU thread."""
    from benchmarks.segmenter_pixels import measure

    host, _ = on_device
    row = measure(host, pattern(60, 80, seed=1), np.array([[5, 5, 40, 40], [0, 0, 80, 60]], np.float32),
                  torch.device("cpu"), repeats=1)
    assert row["device_rle_equals_host_encoding"] and row["boxes"] == 2 and row["image"] == [60, 80]
    assert set(row["host_one_thread"]) == {"resize_ms", "upsample_ms", "rle_ms"}
    assert set(row["device"]) == {"resize_ms", "upsample_ms", "runs_ms", "rle_from_runs_ms"}
