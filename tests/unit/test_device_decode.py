"""The device JPEG path (shared/device_decode.py) against the CPU decoder it stands in for. On CUDA it runs
nvImageCodec or nvJPEG; everywhere the same code runs torchvision's decode_jpeg on the CPU, so the header
probe, orientation, crop, resize, refusals and batching are checked on every machine. The tests that take
the `decoder` fixture run again with each CUDA decoder where there is a GPU (marked `gpu`:
`pytest -m gpu` runs only those, as bench/device_run.sh does on a lent machine)."""

from __future__ import annotations

import gc
import io

import numpy as np
import pytest
import torch
from PIL import Image

from shared.device_decode import DecodeSplit, DeviceJpegDecoder, load_split, stack_pixels
from shared.errors import DecodeError
from shared.imaging import EncodedJpeg, decode_image, probe_jpeg
from shared.loading import LoadRequest, PhotoLoader
from shared.settings import Settings

SIZE = 96
MAX_PIXELS = 100_000_000


ON_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.fixture(scope="module", params=["torchvision-cpu", pytest.param("torchvision-cuda", marks=ON_CUDA),
                                        pytest.param("nvimgcodec-cuda", marks=ON_CUDA)])
def decoder(request) -> DeviceJpegDecoder:
    if request.param == "nvimgcodec-cuda":
        try:
            return DeviceJpegDecoder._nvimgcodec("cuda")
        except ImportError:
            pytest.skip("nvImageCodec is not installed (the `gpu` extra)")
    return DeviceJpegDecoder.torchvision(request.param.split("-")[1])


def _strict(decoder: DeviceJpegDecoder) -> bool:
    """Whether the decoder must take every JPEG it is given. The hardware engine may refuse some layouts it
    has no circuit for (the CPU pool then decodes them): for it, a photo must be decoded right or refused."""
    return decoder.name != "nvimgcodec_hw"


def _asymmetric(width: int = 450, height: int = 300) -> Image.Image:
    """Gradients and a white block in one corner: every flip and turn changes the pixels."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8)
    pixels[: height // 5, : width // 4] = 255
    return Image.fromarray(pixels)


def _jpeg(image: Image.Image, *, orientation: int = 1, **save) -> bytes:
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92, exif=exif.tobytes(), **save)
    return buffer.getvalue()


def _hwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(1, 2, 0).cpu().numpy()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_exif_orientation_gives_the_pixels_the_cpu_decoder_gives(decoder, orientation):
    data = _jpeg(_asymmetric(), orientation=orientation)
    cpu = decode_image(data, size=SIZE, max_pixels=MAX_PIXELS)
    jpeg = probe_jpeg(data, max_pixels=MAX_PIXELS, progressive=decoder.progressive)
    (pixels,), refused = decoder.decode([jpeg], SIZE)
    assert refused == [] and pixels.shape == (3, SIZE, SIZE)
    assert np.abs(_hwc(pixels) - cpu.pixels).mean() < 2.0
    assert (jpeg.width, jpeg.height) == (cpu.width, cpu.height)
    if orientation != 1:  # the same file read as upright is another picture: the check above can fail
        (upright,), _ = decoder.decode([data], SIZE)
        assert np.abs(_hwc(upright) - cpu.pixels).mean() > 20


def test_the_probe_leaves_to_the_cpu_what_a_device_decoder_cannot_take():
    image = _asymmetric()
    png = io.BytesIO()
    image.save(png, "PNG")
    cmyk = io.BytesIO()
    image.convert("CMYK").save(cmyk, "JPEG")
    progressive = _jpeg(image, progressive=True)
    assert probe_jpeg(png.getvalue(), max_pixels=MAX_PIXELS, progressive=True) is None
    assert probe_jpeg(cmyk.getvalue(), max_pixels=MAX_PIXELS, progressive=True) is None
    assert probe_jpeg(progressive, max_pixels=MAX_PIXELS, progressive=False) is None  # the hardware engine
    assert isinstance(probe_jpeg(progressive, max_pixels=MAX_PIXELS, progressive=True), EncodedJpeg)
    grey = probe_jpeg(_jpeg(image.convert("L")), max_pixels=MAX_PIXELS, progressive=False)
    assert isinstance(grey, EncodedJpeg)
    with pytest.raises(DecodeError, match="decompression bomb"):
        probe_jpeg(_jpeg(image), max_pixels=1000, progressive=True)
    with pytest.raises(DecodeError, match="not an image"):
        probe_jpeg(b"", max_pixels=MAX_PIXELS, progressive=True)


def test_a_corrupt_jpeg_is_refused_by_index_and_the_rest_of_the_batch_decodes(decoder):
    good = [_jpeg(_asymmetric(300 + 20 * i, 200)) for i in range(3)]
    truncated = good[0][: good[0].find(b"\xff\xda") - 100]  # cut in its tables: no decoder can go on
    grey = _jpeg(_asymmetric().convert("L"))
    tensors, refused = decoder.decode([good[0], truncated, good[1], grey, good[2]], SIZE)
    assert refused == [1] or (not _strict(decoder) and refused == [1, 3])  # the engine may leave grey to the pool
    assert all(tensors[k] is not None and tensors[k].shape == (3, SIZE, SIZE) for k in (0, 2, 4))
    if tensors[3] is not None:
        grey_cpu = decode_image(grey, size=SIZE, max_pixels=MAX_PIXELS).pixels
        assert np.abs(_hwc(tensors[3]) - grey_cpu).mean() < 2.0


@pytest.mark.parametrize("kind", ["processes", "threads"])
def test_a_jpeg_cut_short_in_its_scan_never_reaches_the_device_and_fails_with_a_recorded_error(kind, tmp_path):
    """A GPU codec may fill in what a cut-short file lacks and return pixels; Pillow says the file is
    truncated. So the probe leaves such a file to the pool, which records the error, as on a CPU worker.
    An end marker inside the headers (an EXIF thumbnail's, here a comment's) does not count, and data
    appended after the end (a second picture) does not stop a whole JPEG from going to the device."""
    image = _asymmetric(600, 400)
    whole = _jpeg(image, comment=b"thumbnail \xff\xd8 ... \xff\xd9")
    scan = whole.rfind(b"\xff\xda")
    cut = whole[: scan + (len(whole) - scan) // 2]
    appended = whole + _jpeg(_asymmetric(60, 40))
    assert probe_jpeg(cut, max_pixels=MAX_PIXELS, progressive=True) is None
    assert isinstance(probe_jpeg(appended, max_pixels=MAX_PIXELS, progressive=False), EncodedJpeg)
    assert isinstance(probe_jpeg(whole + b"\0" * 64, max_pixels=MAX_PIXELS, progressive=False), EncodedJpeg)
    for name, data in (("cut.jpg", cut), ("appended.jpg", appended)):
        (tmp_path / name).write_bytes(data)
    loader = PhotoLoader(Settings(file_roots=str(tmp_path)), kind=kind, workers=2)
    try:
        failed, taken = loader.load([LoadRequest((tmp_path / n).as_uri(), SIZE, device_jpeg=True)
                                     for n in ("cut.jpg", "appended.jpg")])
    finally:
        loader.close()
    assert failed.image.stage == "decode" and "truncated" in failed.image.reason
    assert isinstance(taken.image, EncodedJpeg)


def _assert_the_pool_decodes_the_batch(tmp_path, decoder: DeviceJpegDecoder) -> None:
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"p{i}.jpg")
        paths[-1].write_bytes(_jpeg(_asymmetric(300 + 20 * i, 200)))
    loader = PhotoLoader(Settings(file_roots=str(tmp_path)), kind="threads", workers=2)
    try:
        results, on_device = load_split(loader, decoder, DecodeSplit(1.0),
                                        [LoadRequest(path.as_uri(), SIZE) for path in paths], [0, 1, 2])
    finally:
        loader.close()
    assert on_device == 0
    for path, result in zip(paths, results):
        assert np.array_equal(result.image.pixels, decode_image(path.read_bytes(), size=SIZE,
                                                                max_pixels=MAX_PIXELS).pixels)


def test_a_codec_failing_with_any_error_leaves_the_whole_batch_to_the_pool(tmp_path):
    """The codecs' bindings raise more than RuntimeError (a ValueError or TypeError for an input they do not
    take): whatever it is, the batch's photos are decoded by the pool, not lost with the batch."""
    decoder = DeviceJpegDecoder.torchvision("cpu")

    def broken(*_args, **_kwargs):
        raise ValueError("unsupported code stream")

    decoder._impl = broken
    _assert_the_pool_decodes_the_batch(tmp_path, decoder)


def test_a_codec_that_drops_an_image_from_its_answer_leaves_the_whole_batch_to_the_pool(tmp_path):
    """nvImageCodec skips an image over NVIMGCODEC_MAX_IMAGE_SIZE without a None in its place (older releases
    skip every failed one): the images after it would be taken for their neighbours' and tagged wrongly."""
    decoder = DeviceJpegDecoder.torchvision("cpu")
    decode_jpeg = decoder._impl
    decoder._impl = lambda datas, **kwargs: decode_jpeg(datas, **kwargs)[1:]
    _assert_the_pool_decodes_the_batch(tmp_path, decoder)


def test_the_end_marker_check_leaves_almost_no_whole_real_jpeg_to_the_pool(realdata):
    """The check that keeps cut-short JPEGs off the device must not cost a GPU worker its device decodes:
    of the real JPEGs that Pillow decodes whole, it leaves fewer than 2 % to the pool (one, a BlackBerry
    photo whose trailer holds the start-of-scan bytes)."""
    whole = []
    for path in sorted(realdata.rglob("*")):
        if path.suffix.lower() in (".jpg", ".jpeg"):
            data = path.read_bytes()
            try:
                decode_image(data, size=SIZE, max_pixels=MAX_PIXELS)
            except DecodeError:
                continue
            whole.append((path.name, data))
    left = [name for name, data in whole if probe_jpeg(data, max_pixels=MAX_PIXELS, progressive=True) is None
            and Image.open(io.BytesIO(data)).mode in ("RGB", "L")]
    assert len(whole) > 100
    assert len(left) < 0.02 * len(whole), left


def test_a_batch_of_mixed_shapes_and_orientations_gives_each_photo_its_own_pixels(decoder, monkeypatch):
    """Photos of one shape and orientation are resized together, a few at a time: each still gets exactly
    the pixels it gets alone, in its place in the batch."""
    monkeypatch.setattr(DeviceJpegDecoder, "GROUP_AT_MOST", 2)  # the group of four is split, too
    rng = np.random.default_rng(3)

    def photo(width: int, height: int, orientation: int = 1, mode: str = "RGB") -> bytes:
        image = np.asarray(_asymmetric(width, height)).copy()
        image[rng.integers(0, height - 40):, rng.integers(0, width - 40):] = rng.integers(0, 256, 3)  # its own
        return _jpeg(Image.fromarray(image).convert(mode), orientation=orientation)

    photos = [photo(450, 300), photo(450, 300, 6), photo(450, 300), photo(300, 450), photo(450, 300),
              photo(450, 300, 6), photo(450, 300, mode="L"), photo(450, 300)]
    jpegs = [probe_jpeg(p, max_pixels=MAX_PIXELS, progressive=decoder.progressive) for p in photos]
    together, refused = decoder.decode(jpegs, SIZE)
    assert refused == [] or (not _strict(decoder) and refused == [6])  # [6] is the greyscale photo
    for jpeg, pixels in zip(jpegs, together):
        if pixels is None:
            continue
        (alone,), _ = decoder.decode([jpeg], SIZE)
        assert pixels.shape == (3, SIZE, SIZE)
        assert torch.allclose(pixels, alone, atol=1e-3)
    assert not torch.allclose(together[0], together[2], atol=1.0)  # same shape, different photos


def test_real_photos_taken_by_the_device_path_match_the_cpu_decode(decoder, realdata):
    """Every real JPEG the probe hands to a device: same GPS and size as the CPU path, nearly the same
    pixels (Pillow's draft mode scales in the DCT, the device resizes the full image). The hardware engine
    may leave a few to the pool, not most."""
    diffs, refusals = [], 0
    for path in sorted(p for p in realdata.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")):
        data = path.read_bytes()
        try:
            cpu = decode_image(data, size=224, max_pixels=MAX_PIXELS)
            jpeg = probe_jpeg(data, max_pixels=MAX_PIXELS, progressive=decoder.progressive)
        except DecodeError:
            continue
        if jpeg is None:
            continue
        (pixels,), refused = decoder.decode([jpeg], 224)
        if refused and not _strict(decoder):
            refusals += 1
            continue
        assert refused == [], path.name
        assert (jpeg.gps, jpeg.width, jpeg.height) == (cpu.gps, cpu.width, cpu.height), path.name
        diffs.append(float(np.abs(_hwc(pixels) - cpu.pixels).mean()))
    assert len(diffs) > 100 and refusals < len(diffs) / 4
    assert np.median(diffs) < 3.0 and max(diffs) < 12.0


def test_stacking_cpu_and_device_images_keeps_order_and_pixels():
    rng = np.random.default_rng(0)
    cpu = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(3)]
    assert isinstance(stack_pixels(cpu, "cpu"), np.ndarray)  # the CPU path is left as it was
    mixed = stack_pixels([cpu[0], torch.from_numpy(cpu[1]).permute(2, 0, 1).float(), cpu[2]], "cpu")
    assert mixed.shape == (3, 3, SIZE, SIZE)
    assert np.array_equal(mixed.permute(0, 2, 3, 1).numpy(), np.stack(cpu).astype(np.float32))
    on_device = stack_pixels([torch.from_numpy(c).permute(2, 0, 1).float() for c in cpu[::-1]], "cpu")
    assert np.array_equal(on_device.permute(0, 2, 3, 1).numpy(), np.stack(cpu[::-1]).astype(np.float32))


@pytest.mark.parametrize("kind", ["processes", "threads"])
def test_the_pool_returns_device_jpegs_undecoded_and_decodes_the_rest(kind, tmp_path):
    image = _asymmetric()
    (tmp_path / "a.jpg").write_bytes(_jpeg(image, orientation=6))
    (tmp_path / "p.jpg").write_bytes(_jpeg(image, progressive=True))
    image.save(tmp_path / "c.png")
    loader = PhotoLoader(Settings(file_roots=str(tmp_path)), kind=kind, workers=2)
    try:
        a, p, c = loader.load([LoadRequest((tmp_path / n).as_uri(), SIZE, device_jpeg=True)
                               for n in ("a.jpg", "p.jpg", "c.png")])
        again, = loader.load([LoadRequest("file:///nowhere.jpg", SIZE, data=a.image.data)])
    finally:
        loader.close()
    assert isinstance(a.image, EncodedJpeg) and a.image.orientation == 6 and a.image.width == 300
    assert not isinstance(p.image, EncodedJpeg)  # progressive, and this request did not allow it
    assert c.image.pixels.shape == (SIZE, SIZE, 3)
    assert again.image.pixels.shape == (SIZE, SIZE, 3)  # bytes already fetched: decoded, not fetched again


def test_no_device_decoder_is_detected_without_cuda():
    assert DeviceJpegDecoder.detect("cpu") is None
    if not torch.cuda.is_available():
        assert DeviceJpegDecoder.detect("cuda") is None


def test_a_decoder_is_checked_against_the_cpu_decoder_before_it_is_used(decoder):
    """detect() runs this check: a codec whose pixels differ (here one said to turn photos upright itself
    that does not) is refused, and the worker keeps decoding on the CPU."""
    from torchvision.io import decode_jpeg
    decoder.check_against_cpu()
    wrong = DeviceJpegDecoder("torchvision_cpu", "cpu", decode_jpeg, progressive=True, applies_orientation=True)
    with pytest.raises(RuntimeError, match="differ from the CPU decoder"):
        wrong.check_against_cpu()


def test_the_split_learns_the_share_that_makes_both_sides_finish_together():
    split = DecodeSplit()
    assert split.share == 0.5  # until both sides were seen
    for _ in range(40):  # the device does 600 photos a second, the pool 200: the device takes three quarters
        split.observe("device", 600, 1.0)
        split.observe("cpu", 100, 0.5)
    assert split.share == pytest.approx(0.75, abs=0.01)
    for _ in range(40):  # a pool that can hardly decode still keeps a few photos, so it is still measured
        split.observe("cpu", 1, 1.0)
    assert split.share == DecodeSplit.HIGH
    fixed = DecodeSplit(0.3)
    fixed.observe("device", 1000, 1.0)
    assert fixed.share == 0.3 and fixed.rates == {}


@pytest.mark.parametrize("kind", ["processes", "threads"])
def test_a_split_batch_decodes_its_share_on_the_device_and_the_rest_in_the_pool(decoder, tmp_path, kind):
    paths, rng = [], np.random.default_rng(5)
    for i in range(8):  # grainy, so each JPEG is large enough to come back through the arena (spill.MIN_BYTES)
        image = np.asarray(_asymmetric(1200 + 40 * i, 800), dtype=np.int16) + rng.integers(-12, 13, (800, 1200 + 40 * i, 3))
        path = tmp_path / f"p{i}.jpg"
        path.write_bytes(_jpeg(Image.fromarray(image.clip(0, 255).astype(np.uint8)), orientation=1 + i % 8))
        paths.append(path)
    _asymmetric().save(tmp_path / "p8.png")
    paths.append(tmp_path / "p8.png")
    requests = [LoadRequest(path.as_uri(), SIZE) for path in paths]
    loader = PhotoLoader(Settings(file_roots=str(tmp_path)), kind=kind, workers=2)
    learning = DecodeSplit()
    try:
        results, on_device = load_split(loader, decoder, DecodeSplit(0.75), requests, list(range(9)))
        load_split(loader, decoder, learning, requests, list(range(9)))
        pixels = [p if isinstance(p, torch.Tensor) else p.copy() for p in (r.image.pixels for r in results)]
        del results
        if decoder.device.startswith("cuda"):
            torch.cuda.synchronize()  # the pipeline's forward pass has waited for the device by this point
        decoder.inputs_read()  # as the pipeline does once the batch's forward pass has finished
        gc.collect()
        # Nothing either batch took from the shared-memory arena is kept once its results are let go: on
        # CUDA the JPEGs were held until the device had read them, and no longer.
        left_in_arena = loader.arena.blocks_taken if loader.arena is not None else 0
    finally:
        loader.close()
    assert left_in_arena == 0
    refused = on_device < 7 and not _strict(decoder)
    assert on_device == round(9 * 0.75) == 7 or refused  # the first seven photos, all JPEGs
    assert [isinstance(p, torch.Tensor) for p in pixels][:on_device] == [True] * on_device
    assert [isinstance(p, torch.Tensor) for p in pixels][7:] == [False] * 2
    for path, got in zip(paths, pixels):
        expected = decode_image(path.read_bytes(), size=SIZE, max_pixels=MAX_PIXELS).pixels
        got = _hwc(got) if isinstance(got, torch.Tensor) else got.astype(np.float32)
        assert np.abs(got - expected).mean() < 2.0, path.name
    assert set(learning.rates) == {"device", "cpu"}  # both sides were timed

