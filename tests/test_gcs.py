"""Tests of the Cloud Storage image folder (gcs.py) and generate_blob_list.py against a real
storage server: gcp-storage-emulator on localhost, optionally behind a fault-injecting proxy."""
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader

from gcs_fixtures import ImageBucket
from runtime import gcs
from runtime.gcs import CorruptImageError, GCSError, GCSImageFolder
from runtime.gcs_client import GCSSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_RETRY = dict(retry_initial_delay=0.01, retry_deadline=30.0, timeout=10.0)


def to_array(image):
    return torch.from_numpy(np.asarray(image).copy())


def check_batches(batches, order, bucket: ImageBucket, names):
    """Every index of ``order`` arrived exactly once, in order, with the right pixels and label."""
    images = [img for imgs, _ in batches for img in imgs]
    labels = [int(label) for _, batch_labels in batches for label in batch_labels]
    assert len(images) == len(order)
    for image, label, i in zip(images, labels, order):
        assert np.array_equal(image.numpy(), bucket.rgb(names[i])), names[i]
        assert label == bucket.label(names[i])


def loader(ds, order, batch_size=4, workers=2):
    sampler = BatchSampler(order, batch_size=batch_size, drop_last=False)
    return DataLoader(ds, batch_sampler=sampler, num_workers=workers)


# ------------------------------------------------------------------------------ no server needed
def test_gcs_source_and_url_validation():
    with pytest.raises(ValueError, match="bare bucket name"):
        GCSSource("gs://b", "gs://b/train.txt", "gs://b/val.txt")
    with pytest.raises(ValueError, match="train_blob_list"):
        GCSSource("b", "", "gs://b/val.txt")
    assert gcs.parse_gs_url("gs://b/lists/train.txt") == ("b", "lists/train.txt")
    with pytest.raises(ValueError, match="gs://bucket/path"):
        gcs.parse_gs_url("b/lists/train.txt")


def test_local_blob_list_class_mapping(tmp_path, monkeypatch):
    # No request is made here; the variable keeps credential discovery off the network.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    lst = tmp_path / "train.txt"
    lst.write_text("# comment\ntrain/zebra/1.jpg\ntrain/ant/2.jpg\n\ngs://b/train/cat/3.jpg\n")
    ds = GCSImageFolder("b", str(lst), check_bucket=False)
    assert ds.classes == ["ant", "cat", "zebra"] and ds.targets == [2, 0, 1] and len(ds) == 3
    assert ds.object_url(2) == "gs://b/train/cat/3.jpg"
    sub = GCSImageFolder("b", str(lst), indices=[2, 0], check_bucket=False)
    assert sub.targets == [1, 2] and sub.object_name(-1) == "train/zebra/1.jpg"
    (tmp_path / "val.txt").write_text("val/cat/9.jpg\n")
    val = GCSImageFolder("b", str(tmp_path / "val.txt"), classes=ds.classes, check_bucket=False)
    assert val.targets == [1]  # the training set's mapping, not val's own
    (tmp_path / "bad.txt").write_text("train/a/1.jpg\nno_class.jpg\n")
    with pytest.raises(ValueError, match="line 2.*<class>/<file>"):
        GCSImageFolder("b", str(tmp_path / "bad.txt"), check_bucket=False)
    with pytest.raises(ValueError, match="missing from the given classes"):
        GCSImageFolder("b", str(lst), classes=["ant"], check_bucket=False)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        GCSImageFolder("b", str(tmp_path / "nope.txt"), check_bucket=False)
    with pytest.raises(IndexError):
        ds[3]


# ------------------------------------------------------------------------------ real emulator
@pytest.mark.slow
def test_generate_list_then_train_from_stream(imagenet_bucket, gcs_env, tmp_path):
    """generate_blob_list.py (a real subprocess) -> blob list in the bucket -> DataLoader with two
    workers streaming batches -> a few SGD steps."""
    out = f"gs://{imagenet_bucket.name}/lists/generated-train.txt"
    env = dict(os.environ, PYTHONPATH=ROOT)
    for output in (out, str(tmp_path / "lists" / "train.txt")):
        run = subprocess.run([sys.executable, os.path.join(ROOT, "generate_blob_list.py"),
                              "--bucket", imagenet_bucket.name, "--prefix", "train/",
                              "--output", output], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert "wrote 24 images in 3 classes" in run.stderr
    assert (tmp_path / "lists" / "train.txt").read_text().split() == imagenet_bucket.train

    ds = GCSImageFolder(imagenet_bucket.name, out, transform=to_array, max_in_flight=4)
    assert ds.classes == list(imagenet_bucket.classes) and len(ds) == 24  # README.txt skipped
    order = list(np.random.default_rng(0).permutation(len(ds)))
    batches = list(loader(ds, order, batch_size=5))
    check_batches(batches, order, imagenet_bucket, imagenet_bucket.train)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32 * 3, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    for _ in range(3):
        for images, labels in batches:
            loss = torch.nn.functional.cross_entropy(model(images.float() / 255), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < np.mean(losses[:5])


@pytest.mark.slow
def test_generate_blob_list_pages_and_errors(imagenet_bucket, fault_proxy, tmp_path, capsys):
    import generate_blob_list as gbl

    fault_proxy.list_page_size = 5  # real Cloud Storage paginates; make the emulator do it too
    client = gcs.make_client()
    assert gbl.list_images(client, imagenet_bucket.name, "val/", page_size=5) == \
        imagenet_bucket.val
    assert fault_proxy.list_pages == 2  # 6 images + nothing else under val/: two pages

    assert gbl.main(["--bucket", "no-such-bucket", "--output", str(tmp_path / "x.txt")]) == 2
    assert "gs://no-such-bucket does not exist" in capsys.readouterr().err
    assert gbl.main(["--bucket", imagenet_bucket.name, "--prefix", "nothing/",
                     "--output", str(tmp_path / "x.txt")]) == 2
    assert "no image objects under gs://byol-test/nothing/" in capsys.readouterr().err
    assert not (tmp_path / "x.txt").exists()
    with pytest.raises(SystemExit) as exit_info:
        gbl.main(["--help"])
    assert exit_info.value.code == 0 and "blob list" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_faulty_network_every_image_once_and_intact(imagenet_bucket, fault_proxy):
    """Latency, 503s, dropped connections and cut-off bodies between client and server: every
    image still arrives exactly once, bit-exact, and downloads really overlap."""
    fault_proxy.set_faults(latency_s=0.01, error_rate=0.15, drop_rate=0.1, truncate_rate=0.1)
    ds = GCSImageFolder(imagenet_bucket.name, imagenet_bucket.train_list, transform=to_array,
                        max_in_flight=6, **FAST_RETRY)
    order = list(range(len(ds))) * 2  # two epochs' worth
    batches = list(loader(ds, order, batch_size=8))
    check_batches(batches, order, imagenet_bucket, imagenet_bucket.train)
    assert fault_proxy.errors_503 and fault_proxy.drops and fault_proxy.truncations
    assert 2 <= fault_proxy.max_in_flight <= 2 * 6  # concurrent, and bounded per worker
    assert fault_proxy.over_budget == 0


@pytest.mark.slow
def test_getitems_concurrent_in_order_and_bounded(imagenet_bucket, fault_proxy):
    fault_proxy.set_faults(latency_s=0.02)
    ds = GCSImageFolder(imagenet_bucket.name, imagenet_bucket.train_list, transform=to_array,
                        max_in_flight=4, **FAST_RETRY)
    fault_proxy.reset_counters()
    order = [5, 3, 17, 0, 23, 9, 11, 2, 8, 1]
    items = ds.__getitems__(order)
    check_batches([(torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]))],
                  order, imagenet_bucket, imagenet_bucket.train)
    assert fault_proxy.max_in_flight == 4 and fault_proxy.requests == len(order)
    clone = pickle.loads(pickle.dumps(ds))  # spawn-style workers: no client travels
    assert np.array_equal(clone[4][0].numpy(), ds[4][0].numpy())


@pytest.mark.slow
def test_retries_exhausted_name_the_object(imagenet_bucket, fault_proxy):
    ds = GCSImageFolder(imagenet_bucket.name, imagenet_bucket.train_list,
                        retry_initial_delay=0.01, retry_deadline=0.5, timeout=5.0)
    fault_proxy.set_faults(error_rate=1.0)
    url = ds.object_url(3)
    with pytest.raises(GCSError, match=f"giving up on {url}"):
        ds[3]
    with pytest.raises(GCSError, match="giving up on gs://byol-test/train/"):
        ds.__getitems__([0, 1, 2])
    assert fault_proxy.errors_503 > 4  # it did retry before giving up


@pytest.mark.slow
def test_missing_bucket_list_object_and_corrupt_jpeg(imagenet_bucket, gcs_admin_client, gcs_env,
                                                     tmp_path):
    lst = tmp_path / "train.txt"
    lst.write_text("".join(f"{n}\n" for n in imagenet_bucket.train))
    with pytest.raises(FileNotFoundError, match="bucket gs://no-such-bucket does not exist"):
        GCSImageFolder("no-such-bucket", str(lst))
    with pytest.raises(FileNotFoundError, match="blob list gs://byol-test/lists/nope.txt"):
        GCSImageFolder(imagenet_bucket.name, "gs://byol-test/lists/nope.txt")
    with pytest.raises(FileNotFoundError, match="gs://byol-test/train/x/gone.jpg, the first"):
        (tmp_path / "gone.txt").write_text("train/x/gone.jpg\n" + lst.read_text())
        GCSImageFolder(imagenet_bucket.name, str(tmp_path / "gone.txt"))

    good = imagenet_bucket.blobs[imagenet_bucket.train[0]]
    bucket = gcs_admin_client.bucket(imagenet_bucket.name)
    bucket.blob("bad/n0/truncated.jpg").upload_from_string(good[: len(good) // 2])
    bucket.blob("bad/n0/garbage.jpg").upload_from_string(b"\xff\xd8 not really a jpeg")
    (tmp_path / "bad.txt").write_text(f"{imagenet_bucket.train[0]}\nbad/n0/missing.jpg\n"
                                      "bad/n0/truncated.jpg\nbad/n0/garbage.jpg\n")
    ds = GCSImageFolder(imagenet_bucket.name, str(tmp_path / "bad.txt"),
                        cache_dir=str(tmp_path / "cache"), **FAST_RETRY)
    with pytest.raises(FileNotFoundError, match="gs://byol-test/bad/n0/missing.jpg not found"):
        ds[1]
    for i, name in ((2, "truncated"), (3, "garbage")):
        with pytest.raises(CorruptImageError, match=f"gs://byol-test/bad/n0/{name}.jpg is not a"):
            ds[i]
        with pytest.raises(CorruptImageError, match=f"{name}.jpg"):
            ds.__getitems__([0, i])
    assert not (tmp_path / "cache" / "byol-test" / "bad").exists()  # corrupt images not cached


CHILD = textwrap.dedent("""
    import os, sys, time
    from runtime import gcs
    real_fdopen = os.fdopen
    class HalfWriter:
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *exc): self.f.close()
        def write(self, data):  # write half the image, then hang until SIGKILLed
            self.f.write(data[: len(data) // 2]); self.f.flush()
            print("HALF-WRITTEN", flush=True); time.sleep(60)
    written = []
    def fdopen(fd, mode="r", *a, **k):
        f = real_fdopen(fd, mode, *a, **k)
        if mode != "wb":
            return f
        written.append(fd)
        return HalfWriter(f) if len(written) == int(sys.argv[3]) else f
    gcs.os.fdopen = fdopen
    ds = gcs.GCSImageFolder(sys.argv[1], sys.argv[2], cache_dir=sys.argv[4], max_in_flight=1)
    for i in range(len(ds)):
        ds[i]
""")


@pytest.mark.slow
def test_cache_survives_sigkill_mid_write(imagenet_bucket, fault_proxy, tmp_path):
    cache = tmp_path / "cache"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen(
        [sys.executable, str(script), imagenet_bucket.name, imagenet_bucket.val_list, "4",
         str(cache)], env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "HALF-WRITTEN"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    files = sorted(p for p in cache.rglob("*") if p.is_file())
    finished = [p for p in files if not p.name.endswith(".part")]
    assert len(finished) == 3 and len(files) == 4  # 3 whole images + 1 half-written temp file
    for p in finished:
        assert p.read_bytes() == imagenet_bucket.blobs[p.relative_to(cache / "byol-test").as_posix()]

    ds = GCSImageFolder(imagenet_bucket.name, imagenet_bucket.val_list, transform=to_array,
                        cache_dir=str(cache), **FAST_RETRY)
    fault_proxy.reset_counters()
    batches = list(loader(ds, list(range(len(ds))), batch_size=3))
    check_batches(batches, list(range(len(ds))), imagenet_bucket, imagenet_bucket.val)
    downloads = sum(n for path, n in fault_proxy.paths.items() if path.startswith("/download/"))
    assert downloads == len(ds) - 3, fault_proxy.paths  # the 3 cached images came from disk
    fault_proxy.set_faults(error_rate=1.0)  # storage now unreachable: the cache alone suffices
    check_batches(list(loader(ds, [5, 0, 2], workers=0)), [5, 0, 2], imagenet_bucket,
                  imagenet_bucket.val)
