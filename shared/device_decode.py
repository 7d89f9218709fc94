"""JPEG decode on the model's device, the GPU path's first stage (an optional extra the worker detects).

The decode pool (shared/loading.py) still fetches every photo and reads its header on the CPU (GPS, size,
orientation, the bomb check); a baseline RGB or greyscale JPEG then comes back whole and is decoded here,
in one batch, straight into device memory: nvImageCodec's hardware JPEG engine when it is installed
(`nvidia-nvimgcodec-cu13` + `nvidia-nvjpeg`, backend HW_GPU_ONLY, the fastest in ../shared/ANCHORS.md),
else torchvision's nvJPEG. Whatever the device refuses (a corrupt file, a failed batch) goes back to the
CPU pool, so a photo never fails for being decoded on the GPU. Crop, resize and orientation are done on
the device too, so the model's input never crosses the PCIe bus as pixels.

Only a share of each batch goes to the device (load_split, DecodeSplit): the pool decodes the others at
the same time, and the share is learnt so that both finish together.

torch is imported only when a decoder is made: the pool processes import shared.imaging, never this."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from shared.imaging import DecodedImage, EncodedJpeg
from shared.loading import Loaded, LoadRequest, PhotoLoader

log = logging.getLogger(__name__)

# Optional extras fail to load in many ways (missing wheel, CUDA driver or library mismatch).
_LOAD_ERRORS = (ImportError, OSError, RuntimeError, AttributeError, TypeError, ValueError)


class HeldUntilRead:
    """Input bytes held until the device has read them. A CUDA decoder may still be copying them from host
    memory after its call returns, and they may be blocks of the decode arena (shared/arena.py) that a
    decode process writes other photos into once the last array over them is gone. Each batch's inputs
    are held with an event recorded on its stream after its decode, and let go, oldest first, once that
    event has passed."""

    def __init__(self, make_event: Callable[[], Any]) -> None:
        self._make_event = make_event
        self._held: deque[tuple[Any, Any]] = deque()
        self._lock = threading.Lock()

    def hold(self, inputs: Any, stream: Any) -> None:
        event = self._make_event()
        event.record(stream)
        with self._lock:
            self._held.append((event, inputs))
        self.let_go()

    def let_go(self) -> None:
        """Lets go of the inputs whose events have passed, oldest first."""
        with self._lock:
            while self._held and self._held[0][0].query():
                self._held.popleft()

    def __len__(self) -> int:
        return len(self._held)


class DeviceJpegDecoder:
    """Batched JPEG decode into centre-cropped, resized (3, size, size) float32 tensors (0..255) on
    ``device``; what it refuses comes back by index for the CPU pool."""

    # Photos of one shape and orientation are turned, cropped and resized together, at most this many at a
    # time: each is float32 at full resolution while it is resized (~108 MB for 12 MP).
    GROUP_AT_MOST = 16

    # name → the resource it occupies (bench: the bound groups stages by resource). The hardware engine is
    # a unit of its own; nvJPEG's kernels run on the SMs beside the model.
    UNITS = {"nvimgcodec_hw": "gpu_jpeg_engine", "torchvision_nvjpeg": "gpu", "torchvision_cpu": "cpu"}

    def __init__(self, name: str, device: str, impl: Any, *, progressive: bool,
                 applies_orientation: bool = False) -> None:
        self.name, self.device, self._impl = name, str(device), impl
        self.progressive = progressive  # whether progressive JPEGs are sent to it (the hardware engine: no)
        self._applies_orientation = applies_orientation  # the codec already turned the pixels upright
        # nvImageCodec does not document its Decoder as safe to share between threads: the batch threads
        # take turns in it (each still overlaps the other's forward pass). torchvision's nvJPEG is.
        self._codec_lock = threading.Lock()
        self.unit = self.UNITS[name]
        self._inputs = HeldUntilRead(self._cuda_event) if self.device.startswith("cuda") else None

    @classmethod
    def detect(cls, device: str) -> DeviceJpegDecoder | None:
        """The best decoder that works on this CUDA device, checked on a real JPEG; None on the CPU or when
        neither codec loads (the worker then decodes everything in its CPU pool)."""
        if not str(device).startswith("cuda"):
            return None
        import torch
        if not torch.cuda.is_available():
            return None
        for make in (cls._nvimgcodec, cls.torchvision):
            try:
                decoder = make(device)
                decoder.check_against_cpu()
                log.info("decoding JPEGs on %s with %s", device, decoder.name)
                return decoder
            except _LOAD_ERRORS as exc:
                log.info("%s: device JPEG decoder unavailable (%s)", make.__name__.strip("_"), exc)
        return None

    def check_against_cpu(self, size: int = 64, tolerance: float = 4.0) -> None:
        """Raises RuntimeError unless this decoder gives the CPU decoder's pixels (mean difference in levels)
        for a JPEG turned by its EXIF orientation: a codec that refuses baseline JPEGs, or turns the pixels
        itself as well, is not used."""
        from shared.imaging import decode_image, probe_jpeg
        data = _probe_jpeg()
        jpeg = probe_jpeg(data, max_pixels=1 << 24, progressive=self.progressive)
        # As bytes, and as the uint8 array over shared memory that the pool hands a live batch's JPEGs in.
        tensors, refused = self.decode([jpeg, replace(jpeg, data=np.frombuffer(data, np.uint8))], size)
        if refused:
            raise RuntimeError(f"{self.name} refused a baseline JPEG")
        expected = decode_image(data, size=size, max_pixels=1 << 24).pixels
        for pixels in tensors:
            difference = float(np.abs(pixels.permute(1, 2, 0).cpu().numpy() - expected).mean())
            if difference > tolerance:
                raise RuntimeError(f"{self.name}'s pixels differ from the CPU decoder's by {difference:.1f} levels")

    @classmethod
    def _nvimgcodec(cls, device: str) -> DeviceJpegDecoder:
        import torch
        from nvidia import nvimgcodec
        kind = nvimgcodec.BackendKind.HW_GPU_ONLY
        # Its default (-1) is the current device, which is cuda:0 where the worker is set to cuda:N.
        index = torch.device(device).index
        device_id = -1 if index is None else index
        try:
            decoder = nvimgcodec.Decoder(device_id=device_id, backends=[nvimgcodec.Backend(kind)])
        except TypeError:  # a spelling that only some releases accept (0.9 has backends= alone)
            decoder = nvimgcodec.Decoder(device_id=device_id, backend_kinds=[kind])
        try:  # orientation is ours to apply (from the header read on the CPU), as for every other path
            params = nvimgcodec.DecodeParams(apply_exif_orientation=False)
            return cls("nvimgcodec_hw", device, (decoder, params), progressive=False)
        except (AttributeError, TypeError):
            return cls("nvimgcodec_hw", device, (decoder, None), progressive=False,
                       applies_orientation=True)

    @classmethod
    def torchvision(cls, device: str) -> DeviceJpegDecoder:
        """torchvision's decode_jpeg: nvJPEG on CUDA; on the CPU (libjpeg-turbo) only for tests, since Pillow's
        draft mode (DCT scaling) in the pool is faster there."""
        from torchvision.io import decode_jpeg
        name = "torchvision_nvjpeg" if str(device).startswith("cuda") else "torchvision_cpu"
        return cls(name, device, decode_jpeg, progressive=True)

    def decode(self, photos: Sequence[EncodedJpeg | bytes], size: int) -> tuple[list[Any], list[int]]:
        """(tensors, refused indices): tensors[i], (3, size, size), is None where the device refused photo i.
        A failure of the codec itself (a CUDA error) refuses the whole batch: the CPU pool decodes it."""
        jpegs = [p if isinstance(p, EncodedJpeg) else EncodedJpeg(p, None, 0, 0, 1) for p in photos]
        out: list[Any] = [None] * len(jpegs)
        try:
            images = self._decode_nvimgcodec(jpegs) if self.name == "nvimgcodec_hw" else self._decode_torchvision(jpegs)
            if len(images) != len(jpegs):  # positions would no longer say whose pixels are whose
                raise RuntimeError(f"{len(images)} images back for {len(jpegs)} JPEGs")
            out = self._finish(images, [jpeg.orientation for jpeg in jpegs], size)
            if self._inputs is not None:
                self._inputs.hold(jpegs, self._stream())
        except Exception as exc:  # noqa: BLE001 - the codec's errors are not all RuntimeErrors; the pool still can
            log.warning("%s failed on a batch of %d (%s: %s); the CPU pool decodes it", self.name, len(jpegs),
                        type(exc).__name__, exc)
            out = [None] * len(jpegs)
        return out, [i for i, t in enumerate(out) if t is None]

    def wait(self) -> None:
        """Returns once this thread's decodes have finished on the device: the codec's call returns when the
        work is queued on the stream, and the hardware engine and the crop and resize run after it."""
        if self.device.startswith("cuda"):
            self._stream().synchronize()

    def inputs_read(self) -> None:
        """Called once a batch's forward pass has finished: its JPEGs (and any earlier batch's) have been read
        by now, and their arena blocks can come back before the next batch is decoded."""
        if self._inputs is not None:
            self._inputs.let_go()

    def _cuda_event(self) -> Any:
        import torch
        return torch.cuda.Event()

    def _stream(self) -> Any:
        import torch
        return torch.cuda.current_stream(self.device)

    def _decode_nvimgcodec(self, jpegs: list[EncodedJpeg]) -> list[Any]:
        import torch
        from nvidia import nvimgcodec
        if not jpegs:
            return []
        decoder, params = self._impl
        # A JPEG from shared memory is a uint8 array (shared/spill.py), which nvImageCodec takes as a CodeStream.
        data = [j.data if isinstance(j.data, bytes) else nvimgcodec.CodeStream(j.data) for j in jpegs]
        # On the thread's stream (an argument since nvImageCodec 0.2): on the default stream, nothing would
        # order the decode before the crop and resize that follow on this one.
        options = {"cuda_stream": torch.cuda.current_stream(self.device).cuda_stream}
        if params is not None:
            options["params"] = params
        with self._codec_lock:
            images = decoder.decode(data, **options)
        # HWC uint8 on the device (None where the engine refused the image); greyscale comes as 1 channel.
        return [None if im is None else torch.as_tensor(im, device=self.device).permute(2, 0, 1) for im in images]

    def _decode_torchvision(self, jpegs: list[EncodedJpeg]) -> list[Any]:
        import torch
        from torchvision.io import ImageReadMode
        if not jpegs:
            return []
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs in favour of TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            # The photo's bytes are viewed, not copied (a copy per photo on the hot path): the decoder only
            # reads them, so torch's warning about a read-only buffer does not apply.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            datas = [torch.frombuffer(j.data, dtype=torch.uint8) for j in jpegs]
            try:
                return list(self._impl(datas, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:  # one bad image fails the whole batch: again one by one
                return [self._one_torchvision(data) for data in datas]

    def _one_torchvision(self, data: Any) -> Any:
        from torchvision.io import ImageReadMode
        try:
            return self._impl(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None

    def _finish(self, images: list[Any], orientations: list[int], size: int) -> list[Any]:
        """Each decoded (C, H, W) image upright, centre-cropped and resized to (3, size, size); None stays None.
        Images of one shape and orientation go through together: done per photo, the Python and the kernel
        launches of a dozen small operations were paid for each of the thousands of photos a second that
        one worker process must carry."""
        import torch
        out: list[Any] = [None] * len(images)
        groups: dict[tuple, list[int]] = {}
        for i, (image, orientation) in enumerate(zip(images, orientations)):
            if image is not None:
                groups.setdefault((tuple(image.shape), orientation), []).append(i)
        for (_, orientation), members in groups.items():
            for start in range(0, len(members), self.GROUP_AT_MOST):
                part = members[start:start + self.GROUP_AT_MOST]
                batch = torch.stack([images[i] for i in part])
                out_part = self._square(self._upright(batch, orientation), size)
                for i, pixels in zip(part, out_part):
                    out[i] = pixels
        return out

    def _upright(self, nchw: Any, orientation: int) -> Any:
        """EXIF orientation 2..8 applied as Pillow's transpose does in shared/imaging.py."""
        if self._applies_orientation or orientation in (0, 1):
            return nchw
        if orientation in (5, 6, 7, 8):
            nchw = nchw.transpose(-1, -2)  # 5 is this transpose alone; 6, 7, 8 add a flip
        flips = {2: (-1,), 3: (-2, -1), 4: (-2,), 6: (-1,), 7: (-2, -1), 8: (-2,)}.get(orientation)
        return nchw.flip(flips) if flips else nchw

    def _square(self, nchw: Any, size: int) -> Any:
        """Shorter side to ``size`` and centre crop, as shared/imaging._square (antialiased bilinear)."""
        import torch.nn.functional as F
        if nchw.shape[1] == 1:
            nchw = nchw.expand(-1, 3, -1, -1)
        h, w = nchw.shape[-2:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        # Contiguous while still uint8: the codecs' HWC pixels would otherwise stay channels-last through
        # .float(), and the antialiased resize on CUDA makes its own contiguous copy, in float32.
        crop = nchw[:, :, top:top + side, left:left + side].contiguous().float()
        return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class DecodeSplit:
    """How many of a batch's photos go to the device decoder while the CPU pool decodes the others.

    Neither side is enough alone for the 12 MP target: the H100's JPEG engine decodes 790 photos a second,
    563 beside the model (../shared/ANCHORS.md), and a pool of 16 cores in draft mode a comparable number.
    Each side's rate (photos per second from the batch's start until that side is done, smoothed) is learnt
    from the batches; the share r_device / (r_device + r_cpu) makes both finish together. A fixed share
    (LANDMARKS_DEVICE_DECODE_SHARE) overrides it."""

    LOW, HIGH = 0.05, 0.95  # each side keeps a few photos, so that its rate keeps being measured
    SMOOTHING = 0.2  # weight of the newest batch

    def __init__(self, fixed: float | None = None) -> None:
        self.fixed = fixed
        self._rates: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def share(self) -> float:
        if self.fixed is not None:
            return self.fixed
        with self._lock:
            device, cpu = self._rates.get("device"), self._rates.get("cpu")
        if not device or not cpu:
            return 0.5  # until both sides were seen once
        return min(self.HIGH, max(self.LOW, device / (device + cpu)))

    @property
    def rates(self) -> dict[str, float]:
        """The learnt rates, photos per second: {"device": ..., "cpu": ...} once each side was seen."""
        with self._lock:
            return dict(self._rates)

    def observe(self, side: str, photos: int, seconds: float) -> None:
        if self.fixed is not None or photos <= 0 or seconds <= 0:
            return
        rate = photos / seconds
        with self._lock:
            old = self._rates.get(side)
            self._rates[side] = rate if old is None else (1 - self.SMOOTHING) * old + self.SMOOTHING * rate


def load_split(loader: PhotoLoader, decoder: DeviceJpegDecoder, split: DecodeSplit, requests: list[LoadRequest],
               eligible: Sequence[int]) -> tuple[list[Loaded], int]:
    """(the photos loaded, how many the device decoded). ``split``'s share of the ``eligible`` requests is
    fetched and header-read by the pool and decoded on the device; the pool decodes the rest meanwhile, and
    whatever the device refuses afterwards."""
    take = round(len(eligible) * split.share)
    device_at = list(eligible[:take])
    chosen = set(device_at)
    cpu_at = [i for i in range(len(requests)) if i not in chosen]
    start = time.perf_counter()
    # The device's photos are sent first: the pool reads their headers before it decodes the others.
    headers = loader.submit([replace(requests[i], device_jpeg=True, device_progressive=decoder.progressive)
                             for i in device_at])
    decodes = loader.submit([requests[i] for i in cpu_at])
    results: list[Any] = [None] * len(requests)
    try:
        for i, loaded in zip(device_at, headers.result()):
            results[i] = loaded
        on_device = _decode_on_device(loader, decoder, results, requests, device_at)
        decoder.wait()  # the device's side is timed until its pixels are there, not until its work was queued
    except BaseException:  # the batch fails: what the pool still sends for it is freed, not kept till shutdown
        headers.discard()
        decodes.discard()
        raise
    split.observe("device", on_device, time.perf_counter() - start)
    for i, loaded in zip(cpu_at, decodes.result()):
        results[i] = loaded
    split.observe("cpu", len(cpu_at), decodes.finished_at - start)
    return results, on_device


def _decode_on_device(loader: PhotoLoader, decoder: DeviceJpegDecoder, results: list[Loaded],
                      requests: list[LoadRequest], device_at: list[int]) -> int:
    """Replaces each EncodedJpeg among ``results`` by its decode: on the device, or in the pool for what the
    device refused (from the bytes already fetched). Returns how many the device decoded."""
    at = [i for i in device_at if isinstance(results[i].image, EncodedJpeg)]
    if not at:
        return 0
    jpegs = [results[i].image for i in at]
    tensors, refused = decoder.decode(jpegs, requests[at[0]].size)
    for i, jpeg, pixels in zip(at, jpegs, tensors):
        if pixels is not None:
            results[i] = Loaded(DecodedImage(pixels, jpeg.gps, jpeg.width, jpeg.height, "JPEG"))
    if refused:
        retry = [replace(requests[at[k]], device_jpeg=False, data=jpegs[k].data) for k in refused]
        for k, loaded in zip(refused, loader.load(retry)):
            results[at[k]] = loaded
    return len(at) - len(refused)


def stack_pixels(images: Sequence[Any], device: Any) -> Any:
    """The batch for Embedder.embed. On the CPU, one (n, size, size, 3) uint8 array (the CPU path, unchanged).
    On CUDA, one (n, 3, size, size) float tensor on ``device``, the device decoder's tensors and the pool's
    arrays in their order: the arrays go over in one asynchronous copy from one pinned buffer, not one
    blocking copy from pageable memory each, which would also wait for the stream's decode before the host
    could queue anything more."""
    on_cuda = _is_cuda(device)
    if not on_cuda and all(isinstance(image, np.ndarray) for image in images):
        return np.stack(images)
    import torch
    from_pool = [i for i, image in enumerate(images) if isinstance(image, np.ndarray)]
    if not from_pool:
        return torch.stack(list(images))
    staging = torch.empty((len(from_pool), *images[from_pool[0]].shape), dtype=torch.uint8, pin_memory=on_cuda)
    torch.stack([torch.from_numpy(images[i]) for i in from_pool], out=staging)  # torch copies without the GIL
    # The caching host allocator keeps the pinned buffer until the stream has read it.
    sent = staging.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    if len(from_pool) == len(images):
        return sent
    batch = list(images)
    for k, i in enumerate(from_pool):
        batch[i] = sent[k]
    return torch.stack(batch)


_streams = threading.local()


def _is_cuda(device: Any) -> bool:
    """A torch.device or its name ("cuda", "cuda:1", "cpu")."""
    return getattr(device, "type", str(device).split(":")[0]) == "cuda"


@contextlib.contextmanager
def thread_stream(device: Any) -> Iterator[None]:
    """On CUDA, this thread's own stream: a batch thread's decode then overlaps another's forward pass
    (on the shared default stream they would run one after the other). Elsewhere nothing."""
    if not _is_cuda(device):
        yield
        return
    import torch
    stream = getattr(_streams, "stream", None)
    if stream is None:
        stream = _streams.stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        yield


def _probe_jpeg() -> bytes:
    """A small JPEG with EXIF orientation 6 whose every turn and flip differs (gradients, one bright corner):
    what check_against_cpu decodes before the worker relies on a decoder."""
    import io
    from PIL import Image
    y, x = np.mgrid[0:240, 0:320]
    pixels = np.stack([x * 255 // 320, y * 255 // 240, (x + y) % 256], -1).astype(np.uint8)
    pixels[:48, :80] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92, exif=exif.tobytes())
    return buffer.getvalue()
