"""The Milvus centroid / reference index: versioned collections behind one atomically swapped alias.

One code path for Milvus standalone/distributed (production) and the milvus-lite gRPC server
(embedded stack, tests), through pymilvus's ``MilvusClient``.

Per model version ``v`` (sanitised to ``[A-Za-z0-9_]``) there are two collections:

* ``lm_centroids_<v>``: id (= landmark_id*1000 + centroid_no), landmark_id, centroid_no, geo_tile,
  lat, lon, embedding — one row per landmark centroid;
* ``lm_references_<v>``: id (= landmark_id*1000 + ref_no), landmark_id, ref_no, embedding — the 3–5
  hand-picked reference embeddings per landmark.

Both carry an exact FLAT index with metric IP (embeddings are L2-normalised float32, so the score is
the cosine similarity).  HNSW/IVF are never used: with a selective ``geo_tile`` filter they can return
fewer hits than exist (milvus-lite even none), and the geo step must be exact.

A version is complete only once ``publish``'s last step has marked both collections sealed, with the
sha256 fingerprint of the gallery they hold (collection properties ``landmarks.publish`` and
``landmarks.gallery_sha256``). They are created marked as filling, so a publish killed at any point (SIGKILL,
OOM) leaves a version that is not listed, cannot be activated, and is dropped by the next publish of it.
Collections published before these marks existed carry none and count as complete.

The alias ``lm_active`` points at the active version's centroid collection; ``activate`` moves it
with a single ``create_alias``/``alter_alias`` call, so readers see either the old or the new version.
The reference collection of a version is derived from the centroid collection's name.

milvus-lite cannot search/query through an alias (it answers "collection 'lm_active' does not
exist"), so readers resolve the alias with ``active_version()`` and address collections by name.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import grpc
import numpy as np
from pymilvus import CollectionSchema, DataType, MilvusClient
from pymilvus.exceptions import MilvusException, ParamError

from shared.errors import InfrastructureError
from shared.geo import tile_of
from shared.settings import MILVUS_MAX_TOP_K

ALIAS = "lm_active"
CENTROID_PREFIX = "lm_centroids_"
REFERENCE_PREFIX = "lm_references_"
ID_STRIDE = 1000  # id = landmark_id * 1000 + centroid_no / ref_no
INSERT_CHUNK = 5000
# The client packs one chunk while the server stores another (about 15 % more rows a second on milvus-lite at dim 512).
INSERTS_IN_FLIGHT = 2
MAX_TOPK = MILVUS_MAX_TOP_K  # Milvus's limit on search limit (milvus-lite does not enforce it; we do)
QUERY_ID_CHUNK = 500  # landmark ids per reference query (usually far below MAX_TOPK rows; more are split)
_SEARCH_PARAMS = {"metric_type": "IP", "params": {}}
_CENTROID_OUT = ["landmark_id", "centroid_no", "lat", "lon"]
_NOT_LOADED_CODE = 101  # Milvus's "collection not loaded"
_ALIAS_NOT_FOUND_CODE = 1600  # Milvus's ErrAliasNotFound
# Collection properties that publish writes: the state from creation, the fingerprint with the last step.
STATE_KEY = "landmarks.publish"
FINGERPRINT_KEY = "landmarks.gallery_sha256"
FILLING, SEALED = "filling", "sealed"
_VERSION = re.compile(r"[A-Za-z0-9_]{1,200}")
T = TypeVar("T")
log = logging.getLogger(__name__)


def _is_not_loaded(e: MilvusException) -> bool:
    text = str(e).lower()
    return e.code == _NOT_LOADED_CODE or "not loaded" in text or "'released'" in text


def _is_missing_alias(e: Exception) -> bool:
    """Current Milvus servers stamp "alias not found" an input error, which _wrap passes on as the
    MilvusException itself; older ones reach us as an InfrastructureError caused by it; milvus-lite says
    "alias ... does not exist"."""
    cause = e.__cause__ if isinstance(e, InfrastructureError) else e
    if not isinstance(cause, MilvusException):
        return False
    text = str(cause).lower()
    return cause.code == _ALIAS_NOT_FOUND_CODE or "not exist" in text or "not found" in text


class IndexVersionError(ValueError):
    """A version that must exist does not, or one that must not exist does (or is active)."""


@dataclass(frozen=True)
class _Stored:
    """What Milvus holds of a version whose collections exist."""
    complete: bool
    fingerprint: str | None = None  # a complete version's gallery; None if published before fingerprints


@dataclass
class Hit:
    landmark_id: int
    centroid_no: int
    score: float  # inner product of L2-normalised embeddings
    lat: float | None = None
    lon: float | None = None


@dataclass
class CentroidRows:
    landmark_ids: np.ndarray  # (n,) int
    centroid_nos: np.ndarray  # (n,) int, 0 <= centroid_no < 1000
    lats: np.ndarray  # (n,) float
    lons: np.ndarray  # (n,) float
    embeddings: np.ndarray  # (n, d) float32, L2-normalised

    def __len__(self) -> int:
        return int(np.asarray(self.landmark_ids).shape[0])


@dataclass
class ReferenceRows:
    landmark_ids: np.ndarray  # (n,) int
    ref_nos: np.ndarray  # (n,) int, 0 <= ref_no < 1000
    embeddings: np.ndarray  # (n, d) float32, L2-normalised

    def __len__(self) -> int:
        return int(np.asarray(self.landmark_ids).shape[0])


# pymilvus pings every 10 s even on an idle channel; gRPC servers with default settings (milvus-lite's
# among them) answer with GOAWAY "too_many_pings" and the client's next call fails. Ping only while
# calls are in flight: an idle worker's broken connection is then found (and redialled) at its next call.
GRPC_OPTIONS = {"grpc.keepalive_permit_without_calls": False}


class _QuietInThisThread(logging.Filter):
    """Drops pymilvus's records in a thread inside _quiet_pymilvus. A filter rather than setLevel: setLevel
    clears the cache of every logger in the process, under logging's lock, and the worker asks for the
    alias once per batch (py-spy put it at a third of the alias check's time)."""

    def __init__(self) -> None:
        super().__init__()
        self.quiet = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.quiet, "on", False)


_QUIET = _QuietInThisThread()
logging.getLogger("pymilvus.decorators").addFilter(_QUIET)


@contextmanager
def _quiet_pymilvus() -> Iterator[None]:
    """pymilvus logs every failed RPC with a traceback; a missing alias is an answer, not an error."""
    _QUIET.quiet.on = True
    try:
        yield
    finally:
        _QUIET.quiet.on = False


def sanitize_version(version: str) -> str:
    """Model versions name collections, PostgreSQL rows and tags alike, so they must already be
    collection-safe: 1-200 letters, digits or underscores (no silent renaming)."""
    if not _VERSION.fullmatch(str(version)):
        raise ValueError(f"model version {version!r} must be 1-200 letters, digits or underscores")
    return str(version)


def centroid_collection(version: str) -> str:
    return CENTROID_PREFIX + sanitize_version(version)


def reference_collection(version: str) -> str:
    return REFERENCE_PREFIX + sanitize_version(version)


def _ids(landmark_ids: np.ndarray, nos: np.ndarray, what: str) -> np.ndarray:
    if nos.size and (nos.min() < 0 or nos.max() >= ID_STRIDE):
        raise ValueError(f"{what} must be in [0, {ID_STRIDE})")
    if landmark_ids.size and landmark_ids.min() < 0:
        raise ValueError("landmark ids must be >= 0")
    ids = landmark_ids * ID_STRIDE + nos
    if np.unique(ids).size != ids.size:
        raise ValueError(f"duplicate (landmark_id, {what}) pairs")
    return ids


def _as_embeddings(x: np.ndarray, n: int, what: str) -> np.ndarray:
    e = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if e.ndim != 2 or e.shape[0] != n or e.shape[1] < 1:
        raise ValueError(f"{what} embeddings must have shape ({n}, d), got {e.shape}")
    if not np.isfinite(e).all():
        raise ValueError(f"{what} embeddings contain NaN or inf")
    return e


def _centroid_columns(centroids: CentroidRows) -> dict[str, np.ndarray]:
    """The centroid collection's columns, checked, but for geo_tile (``_with_tiles``)."""
    n = len(centroids)
    lm = np.asarray(centroids.landmark_ids, dtype=np.int64).reshape(-1)
    cn = np.asarray(centroids.centroid_nos, dtype=np.int64).reshape(-1)
    lats = np.asarray(centroids.lats, dtype=np.float64).reshape(-1)
    lons = np.asarray(centroids.lons, dtype=np.float64).reshape(-1)
    if not (lm.size == cn.size == lats.size == lons.size == n) or n == 0:
        raise ValueError("centroid arrays must be non-empty and of equal length")
    if not (np.isfinite(lats).all() and np.isfinite(lons).all()):
        raise ValueError("centroid lat/lon must be finite")
    embeddings = _as_embeddings(centroids.embeddings, n, "centroid")
    ids = _ids(lm, cn, "centroid_no")
    return {"id": ids, "landmark_id": lm, "centroid_no": cn, "lat": lats, "lon": lons, "embedding": embeddings}


def _with_tiles(ccols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The centroid columns with geo_tile, computed only for an insert: a Python call per row, and a function
    of lat/lon, which the fingerprint holds already."""
    n = len(ccols["id"])
    tiles = np.fromiter((tile_of(a, o) for a, o in zip(ccols["lat"], ccols["lon"])), dtype=np.int64, count=n)
    return {**ccols, "geo_tile": tiles}


def _reference_columns(references: ReferenceRows, dim: int) -> dict[str, np.ndarray]:
    """The reference collection's columns, checked; ``dim`` is the centroids'."""
    m = len(references)
    lm = np.asarray(references.landmark_ids, dtype=np.int64).reshape(-1)
    rn = np.asarray(references.ref_nos, dtype=np.int64).reshape(-1)
    if not (lm.size == rn.size == m):
        raise ValueError("reference arrays must be of equal length")
    embeddings = _as_embeddings(references.embeddings, m, "reference") if m else np.zeros((0, dim), np.float32)
    if embeddings.shape[1] != dim:
        raise ValueError(f"dims differ: centroids {dim}, references {embeddings.shape[1]}")
    return {"id": _ids(lm, rn, "ref_no"), "landmark_id": lm, "ref_no": rn, "embedding": embeddings}


def _fingerprint(ccols: dict[str, np.ndarray], rcols: dict[str, np.ndarray]) -> str:
    """sha256 over the gallery's checked columns, as sent. Each column goes in with its name, dtype and shape,
    so no two galleries give the same bytes; the contiguous arrays are hashed in place, without copies
    (about 2 GB/s, a second or two at the replica's 2M centroids of dim 512)."""
    digest = hashlib.sha256()
    for table, columns in (("centroids", ccols), ("references", rcols)):
        for name, values in columns.items():
            values = np.ascontiguousarray(values)
            digest.update(f"{table}.{name}:{values.dtype.str}:{values.shape};".encode())
            digest.update(values)
    return digest.hexdigest()


def _centroid_schema(dim: int) -> CollectionSchema:
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("landmark_id", DataType.INT64)
    schema.add_field("centroid_no", DataType.INT32)
    schema.add_field("geo_tile", DataType.INT64)
    schema.add_field("lat", DataType.DOUBLE)
    schema.add_field("lon", DataType.DOUBLE)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
    return schema


def _reference_schema(dim: int) -> CollectionSchema:
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("landmark_id", DataType.INT64)
    schema.add_field("ref_no", DataType.INT32)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
    return schema


def _rows(columns: dict[str, np.ndarray], start: int, end: int) -> list[dict]:
    """Rows ``start``..``end`` as pymilvus takes them: Python numbers, each embedding a float32 array."""
    scalars = {key: values[start:end].tolist() for key, values in columns.items() if key != "embedding"}
    embeddings = columns["embedding"][start:end]
    return [{**{key: values[k] for key, values in scalars.items()}, "embedding": embeddings[k]}
            for k in range(end - start)]


class LandmarkIndex:
    """Versioned centroid/reference collections in Milvus, reached through ``uri``.

    ``timeout`` bounds every call (seconds); ``connect_timeout`` bounds the first connection.
    Connection and server failures raise ``InfrastructureError`` (retry later); invalid arguments
    raise ``ValueError`` (``IndexVersionError`` for missing/existing/active versions).
    Thread-safe: the client is created lazily once and pymilvus calls are thread-safe.
    """

    def __init__(
        self,
        uri: str,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
    ):
        self.uri = uri
        self._token = token
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._client: MilvusClient | None = None
        self._lock = threading.Lock()
        self._ref_cache: dict[str, dict[int, np.ndarray | None]] = {}

    # ---------------------------------------------------------------- plumbing
    @contextmanager
    def _wrap(self, op: str) -> Iterator[None]:
        try:
            yield
        except ParamError:
            raise  # a bug in the caller's arguments, not an outage
        except MilvusException as e:
            if e.is_input_error:
                raise
            raise InfrastructureError(f"Milvus at {self.uri}: {op} failed: {e}") from e
        except grpc.RpcError as e:
            raise InfrastructureError(f"Milvus at {self.uri}: {op} failed: {e}") from e

    @property
    def client(self) -> MilvusClient:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    with self._wrap("connect"):
                        self._client = MilvusClient(
                            uri=self.uri, token=self._token or "", timeout=self._connect_timeout,
                            grpc_options=GRPC_OPTIONS,
                        )
        return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                client, self._client = self._client, None
                try:
                    client.close()
                except (MilvusException, grpc.RpcError):
                    pass

    def __enter__(self) -> LandmarkIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _collections(self) -> set[str]:
        with self._wrap("list collections"):
            return set(self.client.list_collections(timeout=self._timeout))

    def _marks(self, name: str) -> dict[str, str]:
        """The publish marks on collection ``name`` (none on one published before there were marks)."""
        with self._wrap(f"describe {name}"):
            properties = self.client.describe_collection(name, timeout=self._timeout).get("properties") or {}
        return {key: value for key, value in properties.items() if key in (STATE_KEY, FINGERPRINT_KEY)}

    def _stored(self, version: str, collections: set[str] | None = None) -> _Stored | None:
        """What publish left of ``version`` (None: none of its collections); ``collections``: the names, if
        listed already."""
        names = self._collections() if collections is None else collections
        pair = [n for n in (centroid_collection(version), reference_collection(version)) if n in names]
        if len(pair) < 2:
            return _Stored(complete=False) if pair else None
        marks = [self._marks(name) for name in pair]
        if not any(marks):  # published before the marks: complete, or an upgrading fleet would lose its version
            return _Stored(complete=True)
        fingerprints = {m.get(FINGERPRINT_KEY) for m in marks}
        sealed = all(m.get(STATE_KEY) == SEALED for m in marks) and len(fingerprints) == 1 and None not in fingerprints
        return _Stored(complete=sealed, fingerprint=fingerprints.pop() if sealed else None)

    def _require(self, version: str) -> _Stored:
        stored = self._stored(version)
        if stored is None:
            raise IndexVersionError(f"index version {version!r} is not published in {self.uri}")
        if not stored.complete:
            raise IndexVersionError(f"index version {version!r} in {self.uri} is incomplete (its publish was "
                                    "interrupted): publish it again")
        return stored

    def is_published(self, version: str) -> bool:
        """Whether ``version`` is completely published (an interrupted publish's leftovers are not)."""
        if not _VERSION.fullmatch(str(version)):
            return False
        stored = self._stored(version)
        return stored is not None and stored.complete

    def holds(self, version: str, centroids: CentroidRows, references: ReferenceRows) -> bool:
        """Whether the published ``version`` holds exactly this gallery (IndexVersionError if not published)."""
        ccols = _centroid_columns(centroids)
        rcols = _reference_columns(references, dim=int(ccols["embedding"].shape[1]))
        return self._holds(version, self._require(version), ccols, rcols)

    def _holds(self, version: str, stored: _Stored, ccols: dict, rcols: dict) -> bool:
        if stored.fingerprint is None:  # published before fingerprints: its row counts are all we can compare
            return self._counts(version) == (len(ccols["id"]), len(rcols["id"]))
        return stored.fingerprint == _fingerprint(ccols, rcols)

    # ---------------------------------------------------------------- publish
    def publish(self, version: str, centroids: CentroidRows, references: ReferenceRows) -> bool:
        """Create, fill, index and load the two collections of ``version``, then mark them sealed with the
        gallery's fingerprint. Re-running it is safe: False (nothing done) if ``version`` already holds this
        gallery; IndexVersionError if it holds another (a version is never overwritten); the leftovers of an
        interrupted publish are dropped and the version published again."""
        ccols = _centroid_columns(centroids)
        rcols = _reference_columns(references, dim=int(ccols["embedding"].shape[1]))
        if not self._needs_publish(version, ccols, rcols):
            return False
        self._create(version, ccols, rcols, _fingerprint(ccols, rcols))
        return True

    def _needs_publish(self, version: str, ccols: dict, rcols: dict) -> bool:
        stored = self._stored(version)
        if stored is None:
            return True
        if not stored.complete:
            log.warning("index version %s in %s is incomplete (a publish was interrupted): dropping it to publish "
                        "it again", version, self.uri)
            self.drop(version)
            return True
        if not self._holds(version, stored, ccols, rcols):
            raise IndexVersionError(
                f"index version {version!r} already exists in {self.uri} with another gallery; a version is never "
                "overwritten: build the model under a new version (`landmarks build --version NEW`) and publish that"
            )
        log.info("index version %s is already published with this gallery: nothing to do", version)
        return False

    def _create(self, version: str, ccols: dict, rcols: dict, fingerprint: str) -> None:
        dim = int(ccols["embedding"].shape[1])
        collections = ((centroid_collection(version), _centroid_schema(dim), _with_tiles(ccols)),
                       (reference_collection(version), _reference_schema(dim), rcols))
        created: list[str] = []
        try:
            with self._wrap(f"publish {version!r}"):
                for name, schema, _ in collections:
                    # Marked from its creation on: whatever kills the publish, the version stays incomplete.
                    self.client.create_collection(name, schema=schema, properties={STATE_KEY: FILLING},
                                                  timeout=self._timeout)
                    created.append(name)
                for name, _, columns in collections:
                    self._insert(name, columns)
                for name in created:
                    self._seal(name)
                for name in created:  # the very last step: complete once both are sealed
                    self.client.alter_collection_properties(
                        name, {STATE_KEY: SEALED, FINGERPRINT_KEY: fingerprint}, timeout=self._timeout)
        except BaseException:
            for name in created:  # leave nothing half-published behind (where the process lives to do it)
                try:
                    self.client.drop_collection(name, timeout=self._timeout)
                except (MilvusException, grpc.RpcError):
                    pass
            raise

    def _insert(self, name: str, columns: dict[str, np.ndarray]) -> None:
        """All rows, INSERT_CHUNK at a time, INSERTS_IN_FLIGHT chunks at once. Once a chunk fails, the
        chunks not yet sent are skipped: against a dead server each would wait out the timeout."""
        n = len(columns["id"])
        failed = threading.Event()

        def send(start: int, end: int) -> None:
            if failed.is_set():
                return
            try:
                self.client.insert(name, _rows(columns, start, end), timeout=self._timeout)
            except BaseException:
                failed.set()
                raise

        with ThreadPoolExecutor(max_workers=INSERTS_IN_FLIGHT) as threads:
            for chunk in [threads.submit(send, s, min(n, s + INSERT_CHUNK)) for s in range(0, n, INSERT_CHUNK)]:
                chunk.result()

    def _seal(self, name: str) -> None:
        """Flushed, sealed segments are visible to every consistency level at once; then the exact index."""
        self.client.flush(name, timeout=self._timeout)
        params = MilvusClient.prepare_index_params()
        params.add_index(field_name="embedding", index_type="FLAT", metric_type="IP")
        self.client.create_index(name, params, timeout=self._timeout)
        self.client.load_collection(name, timeout=self._timeout)

    # ---------------------------------------------------------------- versions
    def activate(self, version: str) -> None:
        """Point ``lm_active`` at the complete ``version`` in one alias call (atomic for readers)."""
        self._require(version)
        cname = centroid_collection(version)
        current = self._alias_target()
        c = self.client
        with self._wrap(f"activate {version!r}"):
            if current is None:
                c.create_alias(cname, ALIAS, timeout=self._timeout)
            elif current != cname:
                c.alter_alias(cname, ALIAS, timeout=self._timeout)

    def deactivate(self) -> None:
        """Remove ``lm_active``: workers then find no active model and hand their batches back."""
        if self._alias_target() is not None:
            with self._wrap("deactivate"):
                self.client.drop_alias(ALIAS, timeout=self._timeout)

    def _alias_target(self) -> str | None:
        """The collection ``lm_active`` points at, or None if the alias does not exist."""
        try:
            with self._wrap("describe alias"), _quiet_pymilvus():
                res = self.client.describe_alias(ALIAS, timeout=self._timeout)
        except (InfrastructureError, MilvusException) as e:
            if _is_missing_alias(e):
                return None
            raise
        return (res or {}).get("collection_name") or None

    def active_version(self) -> str | None:
        """The (sanitised) active version, or None if no version was ever activated."""
        target = self._alias_target()
        if not target or not target.startswith(CENTROID_PREFIX):
            return None
        return target[len(CENTROID_PREFIX) :]

    def row_counts(self, version: str) -> tuple[int, int]:
        """(centroids, references) stored for the published ``version``."""
        self._require(version)
        return self._counts(version)

    def _counts(self, version: str) -> tuple[int, int]:
        counts = []
        for name in (centroid_collection(version), reference_collection(version)):
            rows = self._loaded_call(name, "count", lambda name=name: self.client.query(
                name, filter="", output_fields=["count(*)"], timeout=self._timeout))
            counts.append(int(rows[0]["count(*)"]))
        return counts[0], counts[1]

    def versions(self) -> list[str]:
        """Completely published versions (sanitised), sorted."""
        names = self._collections()
        candidates = (n[len(CENTROID_PREFIX) :] for n in names if n.startswith(CENTROID_PREFIX))
        return sorted(v for v in candidates
                      if _VERSION.fullmatch(v) and (stored := self._stored(v, names)) is not None and stored.complete)

    def drop(self, version: str) -> None:
        """Drop a version's collections; the active version cannot be dropped."""
        v = sanitize_version(version)
        if self.active_version() == v:
            raise IndexVersionError(f"index version {version!r} is active; activate another first")
        with self._wrap(f"drop {version!r}"):
            for name in (centroid_collection(v), reference_collection(v)):
                if self.client.has_collection(name, timeout=self._timeout):
                    self.client.drop_collection(name, timeout=self._timeout)
        self._ref_cache.pop(v, None)

    def _resolve(self, version: str | None) -> str:
        if version is None:
            v = self.active_version()
            if v is None:
                raise IndexVersionError(f"no active index version in {self.uri}")
            return v
        return sanitize_version(version)

    # ---------------------------------------------------------------- search
    @staticmethod
    def _queries(queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2:
            raise ValueError(f"queries must have shape (n, d), got {q.shape}")
        return q

    @staticmethod
    def _check_limit(k: int) -> int:
        k = int(k)
        if not 1 <= k <= MAX_TOPK:
            raise ValueError(f"limit must be in [1, {MAX_TOPK}], got {k}")
        return k

    @staticmethod
    def _hits(res: list) -> list[Hit]:
        out = []
        for h in res:
            ent = h["entity"]
            out.append(
                Hit(
                    landmark_id=int(ent["landmark_id"]),
                    centroid_no=int(ent["centroid_no"]),
                    score=float(h["distance"]),
                    lat=float(ent["lat"]),
                    lon=float(ent["lon"]),
                )
            )
        out.sort(key=lambda x: -x.score)
        return out

    def _loaded_call(self, name: str, op: str, call: Callable[[], T]) -> T:
        """``call`` on collection ``name``, loading it first if the server has released it: a restarted
        milvus-lite (or a Milvus whose query nodes were replaced) comes back with collections released."""
        with self._wrap(f"{op} {name}"):
            try:
                return call()
            except MilvusException as e:
                if not _is_not_loaded(e):
                    raise
                log.warning("Milvus collection %s was released; loading it again", name)
                self.client.load_collection(name, timeout=self._timeout)
                return call()

    def _search(self, cname: str, q: np.ndarray, limit: int, filt: str) -> list[list[Hit]]:
        res = self._loaded_call(cname, "search", lambda: self.client.search(
            cname,
            data=[row for row in q],
            filter=filt,
            limit=limit,
            output_fields=_CENTROID_OUT,
            search_params=_SEARCH_PARAMS,
            anns_field="embedding",
            timeout=self._timeout,
        ))
        return [self._hits(r) for r in res]

    def search_global(self, version: str | None, queries: np.ndarray, k: int,
                      min_score: float | None = None) -> list[list[Hit]]:
        """Top-k centroids per query over the whole version, best first (None = active); with ``min_score``
        only those of them that score at least that."""
        q = self._queries(queries)
        k = self._check_limit(k)
        if q.shape[0] == 0:
            return []
        hits = self._search(centroid_collection(self._resolve(version)), q, k, "")
        return hits if min_score is None else [[h for h in found if h.score >= min_score] for found in hits]

    def search_geo(
        self,
        version: str | None,
        queries: np.ndarray,
        tiles: list[list[int]],
        limit: int,
    ) -> list[list[Hit]]:
        """Per query i, the best ``limit`` centroids whose geo_tile is in ``tiles[i]`` (exact).

        Queries sharing the same tile set go into one search call.  Hits carry the centroid's
        lat/lon for the caller's exact ``in_square`` check.  An empty tile list gives no hits.
        """
        q = self._queries(queries)
        limit = self._check_limit(limit)
        if len(tiles) != q.shape[0]:
            raise ValueError(f"{q.shape[0]} queries but {len(tiles)} tile lists")
        cname = centroid_collection(self._resolve(version))
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(tiles):
            groups.setdefault(tuple(sorted({int(x) for x in t})), []).append(i)
        out: list[list[Hit]] = [[] for _ in range(q.shape[0])]
        for key, idx in groups.items():
            if not key:
                continue
            filt = f"geo_tile in [{', '.join(str(x) for x in key)}]"
            for i, hits in zip(idx, self._search(cname, q[idx], limit, filt)):
                out[i] = hits
        return out

    # ---------------------------------------------------------------- references
    def _reference_rows(self, rname: str, landmark_ids: list[int]) -> Iterator[dict]:
        """The reference rows of ``landmark_ids``. A query answers at most MAX_TOPK rows, so an answer that
        reaches the limit may be cut short: the two halves of the landmarks are queried again. One landmark
        has fewer references than the limit (ref_no < ID_STRIDE), so the halving ends there. Rows are
        yielded, not joined with ``+``: pymilvus fills a result's embeddings only as its iterator hands them out.
        """
        rows = self._loaded_call(rname, "query", lambda: self.client.query(
            rname,
            filter=f"landmark_id in [{', '.join(str(x) for x in landmark_ids)}]",
            output_fields=["landmark_id", "ref_no", "embedding"],
            limit=MAX_TOPK,
            timeout=self._timeout,
        ))
        if len(rows) < MAX_TOPK or len(landmark_ids) == 1:
            yield from rows
            return
        half = len(landmark_ids) // 2
        yield from self._reference_rows(rname, landmark_ids[:half])
        yield from self._reference_rows(rname, landmark_ids[half:])

    def references(self, version: str | None, landmark_ids: Iterable[int]) -> dict[int, np.ndarray]:
        """Reference embeddings per landmark, (r, d) float32 ordered by ref_no.

        Landmarks without references are absent from the result.  Cached per version (immutable).
        """
        v = self._resolve(version)
        cache = self._ref_cache.setdefault(v, {})
        wanted = sorted({int(x) for x in landmark_ids})
        missing = [x for x in wanted if x not in cache]
        if missing:
            rname = reference_collection(v)
            found: dict[int, list[tuple[int, list[float]]]] = {}
            for s in range(0, len(missing), QUERY_ID_CHUNK):
                for r in self._reference_rows(rname, missing[s : s + QUERY_ID_CHUNK]):
                    found.setdefault(int(r["landmark_id"]), []).append(
                        (int(r["ref_no"]), r["embedding"])
                    )
            for x in missing:
                refs = sorted(found.get(x, []), key=lambda t: t[0])
                cache[x] = (
                    np.asarray([e for _, e in refs], dtype=np.float32).reshape(len(refs), -1)
                    if refs
                    else None
                )
        return {x: cache[x] for x in wanted if cache[x] is not None}
