"""utils.tiff.read_tiff: one plane set of any microscopy TIFF, H×W or H×W×C, dtype as stored."""
import numpy as np
import pytest

tifffile = pytest.importorskip("tifffile")

from utils.image_files import ImageReadError  # noqa: E402
from utils.tiff import read_tiff  # noqa: E402

H, W = 12, 17      # H != W so a wrong transpose shows


def _ramp(shape, dtype, scale=1):
    return (np.arange(np.prod(shape)).reshape(shape) * scale).astype(dtype)


def _write(tmp_path, name, data, **kwargs):
    path = tmp_path / name
    tifffile.imwrite(path, data, **kwargs)
    return path


def _same(result, expected):
    assert result.dtype == expected.dtype
    assert result.shape == expected.shape
    np.testing.assert_array_equal(result, expected)


def test_float32_gray(tmp_path):
    data = _ramp((H, W), np.float32, 0.37) - 5.5
    _same(read_tiff(_write(tmp_path, "f32.tif", data)), data)


def test_uint16_gray_12_bit_values_kept(tmp_path):
    data = _ramp((H, W), np.uint16, 19) % 4096
    result = read_tiff(_write(tmp_path, "u16.tiff", data))
    _same(result, data)
    assert result.max() == data.max() > 255          # no rescaling to 8 bit


def test_imagej_two_channels_stored_channel_first(tmp_path):
    data = _ramp((2, H, W), np.uint16, 7)
    path = _write(tmp_path, "cyx.tif", data, imagej=True, metadata={"axes": "CYX"})
    _same(read_tiff(path), np.moveaxis(data, 0, -1))


def test_rgb_uint8(tmp_path):
    data = _ramp((H, W, 3), np.uint8)
    _same(read_tiff(_write(tmp_path, "rgb.tif", data, photometric="rgb")), data)


def test_rgb_planar_separate_is_channel_last(tmp_path):
    data = _ramp((3, H, W), np.uint8)
    path = _write(tmp_path, "planar.tif", data, photometric="rgb", planarconfig="separate")
    _same(read_tiff(path), np.moveaxis(data, 0, -1))


def test_z_stack_gives_first_plane(tmp_path):
    stack = np.stack([np.full((H, W), 10 * (z + 1), np.uint16) for z in range(5)])
    stack[0, 3, 4] = 999                              # mark the first plane
    path = _write(tmp_path, "z.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    _same(read_tiff(path), stack[0])
    plain = _write(tmp_path, "z_plain.tif", stack)   # no axes metadata: 5 planes > 4 → a stack
    _same(read_tiff(plain), stack[0])


def test_time_lapse_with_channels_gives_first_time_point_all_channels(tmp_path):
    data = _ramp((3, 2, H, W), np.uint16, 3)          # T, C, Y, X
    path = _write(tmp_path, "tcyx.tif", data, imagej=True, metadata={"axes": "TCYX"})
    _same(read_tiff(path), np.moveaxis(data[0], 0, -1))


def test_reads_only_the_needed_pages(tmp_path, monkeypatch):
    data = _ramp((6, 2, H, W), np.uint16)             # T, C → 12 pages
    path = _write(tmp_path, "tcyx_big.tif", data, imagej=True, metadata={"axes": "TCYX"})
    keys = []
    original = tifffile.TiffPageSeries.asarray

    def spy(self, *args, **kwargs):
        keys.append(kwargs.get("key"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", spy)
    _same(read_tiff(path), np.moveaxis(data[0], 0, -1))
    assert keys == [[0, 1]]


def test_imagej_single_page_hyperstack(tmp_path):
    data = _ramp((4, 2, H, W), np.uint16, 5)          # only the first IFD is written (> 4 GB style)
    path = _write(tmp_path, "trunc.tif", data, imagej=True, metadata={"axes": "TCYX"}, truncate=True)
    result = read_tiff(path)
    _same(result, np.moveaxis(data[0], 0, -1))
    assert type(result) is np.ndarray                 # a copy, not a view into the memory map


def test_bigtiff(tmp_path):
    data = _ramp((H, W), np.int32, -3)
    _same(read_tiff(_write(tmp_path, "big.tif", data, bigtiff=True)), data)


def test_ome_tiff_channels(tmp_path):
    data = _ramp((3, H, W), np.uint16, 11)
    path = _write(tmp_path, "img.ome.tif", data, ome=True, metadata={"axes": "CYX"})
    _same(read_tiff(path), np.moveaxis(data, 0, -1))


def test_ome_time_z_channels(tmp_path):
    data = _ramp((2, 3, 2, H, W), np.float32, 0.5)    # T, Z, C, Y, X
    path = _write(tmp_path, "tzc.ome.tif", data, ome=True, metadata={"axes": "TZCYX"})
    _same(read_tiff(path), np.moveaxis(data[0, 0], 0, -1))


def test_unlabelled_channel_first_and_singleton_channel(tmp_path):
    data = _ramp((2, H, W), np.uint16)                # written without axes → 'QYX'
    _same(read_tiff(_write(tmp_path, "qyx.tif", data)), np.moveaxis(data, 0, -1))
    single = _ramp((1, H, W), np.float32)
    _same(read_tiff(_write(tmp_path, "one.tif", single, imagej=True, metadata={"axes": "CYX"})), single[0])


def test_many_channels_are_all_kept(tmp_path):
    data = _ramp((6, H, W), np.uint16)
    path = _write(tmp_path, "c6.tif", data, imagej=True, metadata={"axes": "CYX"})
    _same(read_tiff(path), np.moveaxis(data, 0, -1))


def test_bool(tmp_path):
    data = _ramp((H, W), np.int64) % 3 == 0
    _same(read_tiff(_write(tmp_path, "mask.tif", data)), data)


def test_zero_size_image_raises(tmp_path):
    path = tmp_path / "empty.tif"
    with pytest.warns(UserWarning):
        tifffile.imwrite(path, np.zeros((0, 0), np.uint8))
    with pytest.raises(ImageReadError, match="empty.tif.*zero size"):
        read_tiff(path)


def test_truncated_file_raises_naming_file(tmp_path):
    path = _write(tmp_path, "cut.tif", _ramp((64, 64), np.uint16))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.tif"):
        read_tiff(path)


def test_not_a_tiff_raises(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_bytes(b"this is not an image, just text\n" * 4)
    with pytest.raises(ImageReadError, match="notes.tif.*not a readable TIFF"):
        read_tiff(path)
    assert issubclass(ImageReadError, ValueError)


def test_missing_file_raises(tmp_path):
    with pytest.raises(ImageReadError, match="missing.tif"):
        read_tiff(tmp_path / "missing.tif")
