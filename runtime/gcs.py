"""Cloud Storage image folder: streams the ImageNet JPEGs for BYOL pre-training from a bucket.

BYOL is trained on the 1.28 million images of the ImageNet ILSVRC-2012 training set and evaluated
with a linear classifier on its validation set (Grill et al. 2020, arXiv 2006.07733, section 4 and
appendix C). On the cluster those images live in a Cloud Storage bucket, named one per line in a
*blob list* (written by ``generate_blob_list.py``) in ImageFolder layout ``.../<class>/<file>``.

A fetch costs tens of milliseconds of latency, so :class:`GCSImageFolder` keeps up to
``max_in_flight`` downloads running per data-loader worker: torch's ``DataLoader`` hands a whole
batch of indices to :meth:`GCSImageFolder.__getitems__`, which downloads and decodes them on a
bounded thread pool in the sampler's order and applies the (random) transform in the calling
thread, in order, so augmentation randomness does not depend on thread timing. At most
``max_in_flight`` decoded images are waiting at any time, whatever the dataset size.

Transient failures (429, 5xx, timeouts, dropped or cut-off connections) are retried with
exponential back-off by google-cloud-storage's own retry machinery (:func:`make_retry`);
interrupted transfers resume with a range request. Only once retries are exhausted does a
:class:`GCSError` naming ``gs://bucket/object`` surface. An optional ``cache_dir`` keeps every
fetched image on local disk; it is written atomically (temporary file, then rename), so a killed
process never leaves a truncated image and several processes on a node can share the cache.
"""
from __future__ import annotations

import io
import logging
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch.utils.data
from PIL import Image

from augment import to_rgb
from runtime import jpeg_decode
from runtime.gcs_client import (  # noqa: F401
    IMAGE_EXTENSIONS,
    GCSError,
    GCSSource,
    make_client,
    make_retry,
    parse_gs_url,
    read_blob_list,
    write_atomically,
)
from utils import InputError

log = logging.getLogger(__name__)

_LOCK = threading.Lock()  # guards per-process client/pool creation; renewed in forked children
os.register_at_fork(after_in_child=lambda: globals().update(_LOCK=threading.Lock()))


class CorruptImageError(InputError):
    """An object was downloaded but is not a decodable image: bad input (exit 2), one line naming
    the object, also when met mid-run in a data-loader worker (``utils.one_line``)."""


def _open_lazy(data: bytes, url: str) -> Image.Image:
    """The image's header parsed, pixels left to the transform (jpeg_decode.py), or
    CorruptImageError naming ``url``."""
    try:
        return jpeg_decode.open_lazy(data)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"{url} is not a readable image ({type(e).__name__}: {e}); "
                                f"re-upload it or drop it from the blob list") from e


def _decode(data: bytes, url: str) -> Image.Image:
    """Decode image bytes into an RGB PIL image, or raise CorruptImageError naming ``url``."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = to_rgb(img)  # loads every pixel: truncation is caught here
            return rgb.copy() if rgb is img else rgb  # the opened image is closed on leaving this block
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"{url} is not a readable image ({type(e).__name__}: {e}); "
                                f"re-upload it or drop it from the blob list") from e


ClientArg = Union[None, Any, Callable[[], Any]]


class GCSImageFolder(torch.utils.data.Dataset):
    """Map-style dataset over the images named in a blob list, streamed from Cloud Storage.

    Items are ``(transform(pil_rgb_image), class_index)``; class indices follow the sorted class
    names (or ``classes`` if given, e.g. the training set's, so validation uses the same mapping).

    Args:
        bucket: bucket holding the images.
        blob_list: ``gs://bucket/path`` or local path of the blob list.
        transform: applied to each RGB PIL image, in the calling thread, in index order.
        cache_dir: optional local cache directory (images stored under ``cache_dir/bucket/name``).
        max_in_flight: downloads running at once per process (1 = one at a time).
        client: ``None`` (build one per process with :func:`make_client`), a zero-argument
            picklable factory returning a ``storage.Client``, or a ``storage.Client``. A client
            instance serves only the process that passed it; data-loader worker processes build
            their own (same project, endpoint and anonymous-or-ADC credentials), because clients
            are not fork-safe.
        indices: optional positions in the blob list forming this dataset (a split).
        classes: optional full list of class names defining the label mapping.
        retry_deadline, retry_initial_delay: back-off settings of :func:`make_retry` for images.
        startup_retry_deadline: retrying of the start-up checks (blob list, bucket): short, so a
            wrong endpoint or bucket is reported in seconds, not minutes.
        timeout: per-request timeout in seconds.
        check_bucket: verify at start-up that the bucket and the first listed object exist.
    """

    def __init__(self, bucket: str, blob_list: str, transform: Optional[Callable] = None,
                 cache_dir: Optional[str] = None, max_in_flight: int = GCSSource.max_in_flight,
                 client: ClientArg = None, indices: Optional[Sequence[int]] = None, *,
                 classes: Optional[Sequence[str]] = None, retry_deadline: float = GCSSource.retry_deadline,
                 retry_initial_delay: float = 1.0, timeout: float = 60.0,
                 check_bucket: bool = True, startup_retry_deadline: float = GCSSource.startup_retry_deadline):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.bucket, self.blob_list, self.transform = bucket, blob_list, transform
        self.cache_dir, self.max_in_flight, self.timeout = cache_dir, max_in_flight, timeout
        self.retry_deadline, self.retry_initial_delay = retry_deadline, retry_initial_delay
        self.startup_retry_deadline = startup_retry_deadline
        self._set_client_arg(client)

        # A client is built only when needed: ADC discovery may probe the metadata server.
        names = read_blob_list(blob_list, self._connection().client
                               if blob_list.startswith("gs://") else None, startup_retry_deadline)
        if not names:
            raise ValueError(f"blob list {blob_list} names no objects")
        self._store_names(names, classes)
        n = len(names)
        self._positions = None if indices is None else np.asarray(indices, dtype=np.int64)
        if self._positions is not None and len(self._positions) and (
                self._positions.min() < 0 or self._positions.max() >= n):
            raise ValueError(f"indices must lie in [0, {n}) for blob list {blob_list}")
        if check_bucket:
            self._check_bucket(names[0])

    # ------------------------------------------------------------------------------ the listing
    def _store_names(self, names: list[str], classes: Optional[Sequence[str]]) -> None:
        """Keep object names as one UTF-8 buffer plus offsets (numpy arrays survive fork without
        per-object refcount copy-on-write, unlike a list of 1.28M Python strings)."""
        prefix = f"gs://{self.bucket}/"
        encoded, class_names = [], []
        for lineno, name in enumerate(names, 1):
            if name.startswith("gs://"):
                if not name.startswith(prefix):
                    raise ValueError(f"{self.blob_list} line {lineno}: {name!r} is not in bucket "
                                     f"{self.bucket!r}")
                name = name[len(prefix):]
            parts = name.split("/")
            if len(parts) < 2 or not parts[-2] or not parts[-1]:
                raise ValueError(f"{self.blob_list} line {lineno}: {name!r} is not of the form "
                                 f"'.../<class>/<file>'")
            if self.cache_dir is not None and (".." in parts or name.startswith("/")):
                raise ValueError(f"{self.blob_list} line {lineno}: {name!r} cannot be cached "
                                 f"safely ('..' or leading '/')")
            class_names.append(parts[-2])
            encoded.append(name.encode("utf-8"))
        self.classes = sorted(set(class_names)) if classes is None else list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted(set(class_names) - self.class_to_idx.keys())
        if unknown:
            raise ValueError(f"{self.blob_list} has classes {unknown[:5]} missing from the given "
                             f"classes ({len(self.classes)} names)")
        self._labels = np.fromiter((self.class_to_idx[c] for c in class_names), np.int32,
                                   len(class_names))
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._names = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._labels) if self._positions is None else len(self._positions)

    def _position(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i %= len(self)
        return i if self._positions is None else int(self._positions[i])

    @property
    def targets(self) -> list[int]:
        """Class index of every item, in dataset order."""
        labels = self._labels if self._positions is None else self._labels[self._positions]
        return labels.tolist()

    def object_name(self, i: int) -> str:
        p = self._position(i)
        return self._names[self._offsets[p]:self._offsets[p + 1]].tobytes().decode("utf-8")

    def object_url(self, i: int) -> str:
        return f"gs://{self.bucket}/{self.object_name(i)}"

    # ------------------------------------------------------------------ per-process client/pool
    def _set_client_arg(self, client: ClientArg) -> None:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        self._factory: Optional[Callable[[], Any]] = None
        self._spec = dict(pool_size=self.max_in_flight)
        self._given, self._given_pid = None, None
        self._conn, self._conn_pid = None, None
        if isinstance(client, storage.Client):
            self._given, self._given_pid = client, os.getpid()
            self._spec.update(project=client.project, api_endpoint=client.api_endpoint,
                              anonymous=isinstance(client._credentials, AnonymousCredentials))
        elif callable(client):
            self._factory = client
        elif client is not None:
            raise TypeError(f"client must be None, a storage.Client or a factory, got {client!r}")

    def _connection(self) -> SimpleNamespace:
        """This process's client, bucket handle, retry policy and (lazily) thread pool; rebuilt
        on first use in each new process, since clients and pools do not survive a fork."""
        pid = os.getpid()
        if self._conn_pid != pid:
            with _LOCK:
                if self._conn_pid != pid:
                    if self._given is not None and self._given_pid == pid:
                        client = self._given
                    else:
                        client = self._factory() if self._factory else make_client(**self._spec)
                    self._conn = SimpleNamespace(
                        client=client, bucket=client.bucket(self.bucket), pool=None,
                        retry=make_retry(self.retry_deadline, self.retry_initial_delay))
                    self._conn_pid = pid
        return self._conn

    def _thread_pool(self) -> ThreadPoolExecutor:
        conn = self._connection()
        if conn.pool is None:
            with _LOCK:
                if conn.pool is None:
                    conn.pool = ThreadPoolExecutor(self.max_in_flight,
                                                   thread_name_prefix="gcs-fetch")
        return conn.pool

    def __getstate__(self) -> dict:
        """Pickle without the client and thread pool (spawned workers build their own)."""
        state = self.__dict__.copy()
        state.update(_given=None, _given_pid=None, _conn=None, _conn_pid=None)
        return state

    def _check_bucket(self, first_name: str) -> None:
        """Fail at start-up, before training, when the bucket or the listed objects are missing."""
        from google.api_core import exceptions as gexc

        conn = self._connection()
        where = f"gs://{self.bucket}"
        retry = make_retry(self.startup_retry_deadline, self.retry_initial_delay, url=where)
        try:
            if not conn.bucket.exists(retry=retry, timeout=self.timeout):
                raise FileNotFoundError(f"bucket gs://{self.bucket} does not exist (blob list "
                                        f"{self.blob_list}); check data.gcs.bucket")
        except (gexc.Forbidden, gexc.Unauthorized):
            pass  # e.g. anonymous access to a public bucket: bucket metadata is not readable
        except gexc.RetryError as e:
            raise GCSError(f"cannot reach {where} at {conn.client.api_endpoint}: still failing after "
                           f"{self.startup_retry_deadline:g} s of retries (data.gcs.startup_retry_deadline); "
                           f"last error: {e.cause!r}") from None
        if not conn.bucket.blob(first_name).exists(retry=retry, timeout=self.timeout):
            raise FileNotFoundError(f"gs://{self.bucket}/{first_name}, the first object in "
                                    f"{self.blob_list}, does not exist; is the list for this "
                                    f"bucket?")

    # --------------------------------------------------------------------------------- fetching
    def _cache_path(self, name: str) -> str:
        return os.path.join(self.cache_dir, self.bucket, *name.split("/"))

    def _download(self, name: str) -> bytes:
        from google.api_core import exceptions as gexc

        url = f"gs://{self.bucket}/{name}"
        conn = self._connection()
        try:
            return conn.bucket.blob(name).download_as_bytes(
                retry=make_retry(self.retry_deadline, self.retry_initial_delay, url=url), timeout=self.timeout)
        except gexc.NotFound as e:
            raise FileNotFoundError(f"{url} not found (listed in {self.blob_list}); regenerate "
                                    f"the list with generate_blob_list.py") from e
        except (gexc.Forbidden, gexc.Unauthorized) as e:
            raise PermissionError(f"access to {url} denied; check the Application Default "
                                  f"Credentials' storage permissions") from e
        except gexc.RetryError as e:
            raise GCSError(f"giving up on {url} after retrying transient errors for "
                           f"{self.retry_deadline:g} s (data.gcs.retry_deadline); last error: {e.cause!r}") from e
        except Exception as e:  # non-transient HTTP error, data corruption, ...
            raise GCSError(f"failed to download {url}: {type(e).__name__}: {e}") from e

    lazy = False  # True: images come undecoded (jpeg_decode.open_lazy); their header is checked

    def load_image(self, i: int) -> Image.Image:
        """Item ``i`` as an RGB PIL image. Only decodable images enter the cache; an undecodable
        cached file is replaced by a fresh download."""
        name = self.object_name(i)
        url = f"gs://{self.bucket}/{name}"
        decode = _open_lazy if self.lazy else _decode
        if self.cache_dir is None:
            return decode(self._download(name), url)
        path = self._cache_path(name)
        if os.path.exists(path):
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise GCSError(f"cannot read the cache copy of {url} at {path!r}: {e.strerror or e}; "
                               f"check data.gcs.cache_dir ({self.cache_dir})") from None
            try:
                return decode(data, url)
            except CorruptImageError:
                log.warning("cached copy of %s is unreadable; downloading it again", url)
        data = self._download(name)
        image = decode(data, url)
        try:
            write_atomically(path, data)
        except OSError as e:  # full or read-only cache disk: the download itself was fine
            raise GCSError(f"cannot write the cache copy of {url} to {path!r}: {e.strerror or e}; free space "
                           f"in data.gcs.cache_dir ({self.cache_dir}) or remove cache_dir to stream "
                           f"without a cache") from None
        return image

    def _item(self, image: Image.Image, i: int):
        label = int(self._labels[self._position(i)])
        return (self.transform(image) if self.transform is not None else image), label

    def __getitem__(self, i: int):
        return self._item(self.load_image(i), i)

    def __getitems__(self, indices: Sequence[int]) -> list:
        """Items for a whole batch of indices, fetched ``max_in_flight`` at a time on a thread
        pool, in order. The transform runs here, in order, so its random draws are reproducible."""
        indices = list(indices)
        if self.max_in_flight == 1 or len(indices) <= 1:
            return [self[i] for i in indices]
        pool = self._thread_pool()
        pending = deque()
        upcoming = iter(indices)
        for i in upcoming:
            pending.append((i, pool.submit(self.load_image, i)))
            if len(pending) >= self.max_in_flight:
                break
        items = []
        try:
            while pending:
                i, future = pending.popleft()
                image = future.result()
                nxt = next(upcoming, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(self.load_image, nxt)))
                items.append(self._item(image, i))
        finally:
            for _, future in pending:
                future.cancel()
        return items
