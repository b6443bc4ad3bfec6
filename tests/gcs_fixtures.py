"""Reusable Cloud Storage test fixtures: a real storage emulator, a bucket holding a small
ImageFolder of real JPEG files, and a fault-injecting proxy in front of the emulator.

tests/conftest.py imports the fixtures, so every test module can ask for them by name:

* ``gcs_emulator`` (session): a ``gcp-storage-emulator`` subprocess on a free 127.0.0.1 port;
  has ``.url``/``.port``.
* ``gcs_admin_client`` (session): a ``storage.Client`` talking straight to the emulator.
* ``imagenet_bucket`` (session): bucket ``byol-test`` with ``train/<class>/<n>.jpg`` and
  ``val/<class>/<n>.jpg`` (3 classes), a non-image ``train/README.txt``, and the blob lists
  ``gs://byol-test/lists/train.txt`` / ``val.txt``. Returns an :class:`ImageBucket`.
* ``gcs_env`` (function): sets ``STORAGE_EMULATOR_HOST`` to the emulator for the test (clients
  built by ``gcs.make_client`` -- also inside data-loader workers -- then use it).
* ``fault_proxy`` (function): a started :class:`fault_proxy.FaultProxy` in front of the emulator
  (no faults until configured with ``set_faults``); ``STORAGE_EMULATOR_HOST`` points at it.
"""
from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image

from fault_proxy import FaultProxy

BUCKET = "byol-test"
CLASSES = ("n01440764", "n01443537", "n01484850")  # ImageNet-style synset folder names
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """``gcp-storage-emulator`` running in memory as a real subprocess on 127.0.0.1."""

    def __init__(self, timeout: float = 30.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1",
             f"--port={self.port}", "--in-memory", "--quiet"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"storage emulator exited: {self.proc.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"storage emulator did not listen within {timeout}s") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def jpeg_bytes(seed: int, size: int = 32) -> bytes:
    """A real JPEG: a smooth colour gradient plus noise, different for every seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = rng.integers(0, 256, 3)
    img = (base + 4 * x[..., None] + 2 * y[..., None] + rng.integers(0, 24, (size, size, 3)))
    buf = io.BytesIO()
    Image.fromarray((img % 256).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@dataclass
class ImageBucket:
    """What ``imagenet_bucket`` uploaded: names per split and each object's bytes."""

    name: str
    train: list[str]
    val: list[str]
    blobs: dict[str, bytes] = field(repr=False)
    classes: tuple[str, ...] = CLASSES
    train_list: str = f"gs://{BUCKET}/lists/train.txt"
    val_list: str = f"gs://{BUCKET}/lists/val.txt"

    def label(self, name: str) -> int:
        return self.classes.index(name.split("/")[-2])

    def rgb(self, name: str) -> np.ndarray:
        """The decoded RGB pixels of an uploaded image (what a correct loader must deliver)."""
        return np.asarray(Image.open(io.BytesIO(self.blobs[name])).convert("RGB"))


@pytest.fixture(scope="session")
def gcs_emulator():
    emulator = Emulator()
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def gcs_admin_client(gcs_emulator):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="test", credentials=AnonymousCredentials(),
                          client_options={"api_endpoint": gcs_emulator.url})


@pytest.fixture(scope="session")
def imagenet_bucket(gcs_admin_client) -> ImageBucket:
    bucket = gcs_admin_client.create_bucket(BUCKET)
    blobs, train, val = {}, [], []
    for split, per_class, names in (("train", TRAIN_PER_CLASS, train), ("val", VAL_PER_CLASS, val)):
        for cls in CLASSES:
            for n in range(per_class):
                name = f"{split}/{cls}/{cls}_{n:04d}.JPEG"
                blobs[name] = jpeg_bytes(len(blobs))
                bucket.blob(name).upload_from_string(blobs[name], content_type="image/jpeg")
                names.append(name)
    bucket.blob("train/README.txt").upload_from_string(b"not an image")
    for split, names in (("train", train), ("val", val)):
        bucket.blob(f"lists/{split}.txt").upload_from_string("".join(f"{n}\n" for n in names))
    return ImageBucket(BUCKET, sorted(train), sorted(val), blobs)


@pytest.fixture
def gcs_env(gcs_emulator, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
    return gcs_emulator


@pytest.fixture
def fault_proxy(gcs_emulator, monkeypatch):
    with FaultProxy("127.0.0.1", gcs_emulator.port) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        yield proxy
