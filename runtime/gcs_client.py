"""Cloud Storage client plumbing shared by gcs.py and generate_blob_list.py (no torch import,
so the command-line tool starts fast).

BYOL reads the ImageNet ILSVRC-2012 images (Grill et al. 2020, arXiv 2006.07733, section 4) from a
Cloud Storage bucket. This module builds the ``google-cloud-storage`` client (credentials,
connection pool), the retry policy (google-cloud-storage's own ``DEFAULT_RETRY``: exponential
back-off on 429, 408, 5xx, timeouts and dropped connections), reads blob lists and writes local
files atomically.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Optional

from utils import CommandError, OutputWriteError, check_keys, checked_number, env_url, reject, write_bytes_atomically


@dataclass(frozen=True)
class GCSSource:
    """Where the ImageNet images live: a bucket plus train/validation blob lists (the ``data.gcs``
    section of a config, parsed by ``runtime.settings``; the one place of its defaults).

    Blob lists are ``gs://bucket/path`` URLs or local paths; ``cache_dir`` optionally caches
    fetched images on local disk (shared by all processes on a node).
    """

    bucket: str
    train_blob_list: str
    val_blob_list: str
    cache_dir: Optional[str] = None
    max_in_flight: int = 64               # downloads in flight per data-loader worker
    retry_deadline: float = 300.0         # seconds of retrying one image's transient errors
    startup_retry_deadline: float = 30.0  # seconds of retrying the start-up checks (bucket, blob lists)

    def __post_init__(self):
        if self.max_in_flight < 1:
            raise ValueError(f"GCSSource.max_in_flight must be >= 1, got {self.max_in_flight}")
        if not self.bucket or self.bucket.startswith("gs://") or "/" in self.bucket:
            raise ValueError(f"GCSSource.bucket must be a bare bucket name like 'my-imagenet', "
                             f"got {self.bucket!r}")
        for field in ("train_blob_list", "val_blob_list"):
            if not getattr(self, field):
                raise ValueError(f"GCSSource.{field} must be a gs://bucket/path URL or a local "
                                 f"path of a blob list (see generate_blob_list.py)")


def parse_gcs_section(gcs: dict, prefix: str, dataset: str) -> GCSSource:
    """The ``data.gcs`` section of a config (``prefix``: its place there), checked into a
    :class:`GCSSource`; every bad value is a one-line ``ConfigError``."""
    check_keys(gcs, GCSSource, prefix)
    for key in ("bucket", "train_blob_list", "val_blob_list"):
        if not isinstance(gcs.get(key), str) or not gcs.get(key):
            reject(f"{prefix}{key}", gcs.get(key), "required: a non-empty string")
    if dataset != "imagenet":
        reject(prefix.rstrip("."), gcs, "streaming from Cloud Storage is supported for dataset: imagenet")
    if gcs["bucket"].startswith("gs://") or "/" in gcs["bucket"]:
        reject(prefix + "bucket", gcs["bucket"], "expected a bare bucket name, e.g. my-imagenet (no gs://, no /)")
    gcs = {**{f.name: f.default for f in dataclasses.fields(GCSSource) if f.default is not dataclasses.MISSING}, **gcs}
    gcs["max_in_flight"] = checked_number(gcs, "max_in_flight", prefix, int, minimum=1)
    for key in ("retry_deadline", "startup_retry_deadline"):
        gcs[key] = checked_number(gcs, key, prefix, minimum=0, exclusive_min=True)
    return GCSSource(**gcs)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""Object suffixes treated as images (torchvision's ImageFolder list, compared case-insensitively)."""


class GCSError(CommandError, RuntimeError):
    """A Cloud Storage request failed for good (retries exhausted or a non-transient error)."""


def parse_gs_url(url: str) -> tuple[str, str]:
    """Split ``gs://bucket/path/to/object`` into ``(bucket, 'path/to/object')``."""
    bucket, _, name = url[len("gs://"):].partition("/") if url.startswith("gs://") else ("", "", "")
    if not bucket or not name:
        raise ValueError(f"expected a Cloud Storage URL like gs://bucket/path, got {url!r}")
    return bucket, name


def make_retry(deadline: float = 300.0, initial_delay: float = 1.0, max_delay: float = 32.0,
               url: Optional[str] = None):
    """google-cloud-storage's ``DEFAULT_RETRY`` (429, 408, 5xx, connection and timeout errors),
    also retrying builtin ``TimeoutError``s, with exponential back-off from ``initial_delay``
    (doubling, capped at ``max_delay``, jittered by api_core) until ``deadline`` seconds. With
    ``url``, every retried error logs a progress line through api_core's ``on_error`` callback
    (:class:`RetryProgress`)."""
    from google.api_core.retry import Retry
    from google.cloud.storage.retry import _should_retry

    def retryable(exc: Exception) -> bool:
        return _should_retry(exc) or isinstance(exc, (ConnectionError, TimeoutError))

    return Retry(predicate=retryable, initial=initial_delay, maximum=max_delay, multiplier=2.0,
                 timeout=deadline, on_error=RetryProgress(url, deadline) if url else None)


class RetryProgress:
    """``on_error`` of a retry: ``retrying gs://b/o (3rd try, 503 ...)`` on the log, so a long
    retry is never silent. One object per request (it counts the tries)."""

    def __init__(self, url: str, deadline: float):
        self.url, self.deadline, self.tries = url, deadline, 1

    def __call__(self, error: Exception) -> None:
        self.tries += 1
        code = getattr(error, "code", None)
        if not isinstance(code, int):  # google-resumable-media's InvalidResponse carries the HTTP response
            code = getattr(getattr(error, "response", None), "status_code", None)
        reason = f"{int(code)} {type(error).__name__}" if isinstance(code, int) else type(error).__name__
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(self.tries if self.tries < 20 else self.tries % 10, "th")
        log.warning("retrying %s (%d%s try, %s; giving up after %g s)", self.url, self.tries, suffix, reason,
                    self.deadline)


def make_client(project: Optional[str] = None, *, api_endpoint: Optional[str] = None,
                anonymous: Optional[bool] = None, pool_size: int = 32):
    """Build a ``google.cloud.storage.Client`` whose connection pool holds ``pool_size``
    keep-alive connections (one per download in flight).

    Credentials: with ``anonymous=None`` (default) the client uses anonymous access when
    ``STORAGE_EMULATOR_HOST`` is set, otherwise Google's Application Default Credentials, and
    falls back to anonymous access (public buckets only) when none are configured.
    ``anonymous=True``/``False`` forces either. Credentials are never logged.
    """
    import google.auth
    import requests
    from google.auth.credentials import AnonymousCredentials
    from google.auth.exceptions import DefaultCredentialsError
    from google.auth.transport.requests import AuthorizedSession
    from google.cloud import storage

    emulator = env_url("STORAGE_EMULATOR_HOST")  # not a URL: one clear line
    if anonymous is None and emulator:
        anonymous = True
    credentials, kind = None, "anonymous"
    if not anonymous:
        try:
            credentials, adc_project = google.auth.default(scopes=list(storage.Client.SCOPE))
            project, kind = project or adc_project, "application-default"
        except DefaultCredentialsError:
            if anonymous is False:
                raise
            log.info("no Application Default Credentials found; using anonymous access, which "
                     "reaches public buckets only")
    if credentials is None:
        credentials = AnonymousCredentials()

    session = AuthorizedSession(credentials)
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=max(1, pool_size))
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    # Resolve proxy / CA-bundle environment settings once: requests otherwise rescans the whole
    # environment on every request, which costs ~20% of the client's CPU time per image.
    endpoint = api_endpoint or emulator or "https://storage.googleapis.com"
    session.proxies.update(requests.utils.get_environ_proxies(endpoint))
    ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if ca_bundle:
        session.verify = ca_bundle
    session.trust_env = False

    options = {"api_endpoint": api_endpoint} if api_endpoint else None
    client = storage.Client(project=project, credentials=credentials, _http=session,
                            client_options=options)
    log.info("Cloud Storage client (pid %d): %s credentials, endpoint %s", os.getpid(), kind,
             client.api_endpoint)
    return client


def read_blob_list(blob_list: str, client=None, deadline: float = 60.0) -> list[str]:
    """Read a blob list (``gs://bucket/path`` or a local path): one object name per line; blank
    lines and lines starting with ``#`` are skipped. Raises FileNotFoundError when it is missing."""
    if blob_list.startswith("gs://"):
        from google.api_core import exceptions as gexc

        list_bucket, name = parse_gs_url(blob_list)
        client = client or make_client()
        try:
            text = client.bucket(list_bucket).blob(name).download_as_text(
                retry=make_retry(deadline, url=blob_list))
        except gexc.NotFound as e:
            raise FileNotFoundError(f"blob list {blob_list} not found (missing bucket or object); "
                                    f"write it with generate_blob_list.py") from e
        except gexc.RetryError as e:
            raise GCSError(f"cannot read blob list {blob_list} from {client.api_endpoint}: still failing after "
                           f"{deadline:g} s of retries; last error: {e.cause!r}") from None
    else:
        if not os.path.isfile(blob_list):
            raise FileNotFoundError(f"blob list {blob_list!r} not found; give a local file or a "
                                    f"gs://bucket/path written by generate_blob_list.py")
        with open(blob_list, encoding="utf-8") as f:
            text = f.read()
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``
    (``utils.write_bytes_atomically``), so readers (other processes, later runs) see either no file
    or the whole file. Raises the ``OSError`` itself (callers name the file and the remedy)."""
    try:
        write_bytes_atomically(path, data, "file")
    except OutputWriteError as error:
        raise error.__cause__ from None
