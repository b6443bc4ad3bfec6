"""Write the blob list that ``gcs.GCSImageFolder`` streams ImageNet from.

BYOL pre-trains on the ImageNet ILSVRC-2012 training images and evaluates on its validation images
(Grill et al. 2020, arXiv 2006.07733, section 4). Listing 1.28 million objects in a bucket takes
minutes, so it is done once, here: every image object under a prefix (ImageFolder layout
``<prefix><class>/<file>``; the class is the object's parent "directory") is listed page by page,
filtered by image extension, sorted, and written one name per line to a local file or a
``gs://bucket/path`` object.

Example::

    python generate_blob_list.py --bucket my-imagenet --prefix train/ \\
        --output gs://my-imagenet/lists/train.txt
    python generate_blob_list.py --bucket my-imagenet --prefix val/ --output val.txt

Credentials follow ``gcs_client.make_client``: Application Default Credentials, anonymous access for
public buckets (or ``--anonymous``), and ``STORAGE_EMULATOR_HOST`` for a local emulator.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from typing import Optional, Sequence

from runtime.gcs_client import IMAGE_EXTENSIONS, GCSError, make_client, make_retry, parse_gs_url
from utils import InputError, check_output_file, run_command, write_bytes_atomically

DEFAULT_RETRY_DEADLINE = 30.0  # seconds a listing page (or the upload) is retried before giving up

log = logging.getLogger(__name__)


def list_images(client, bucket: str, prefix: str,
                extensions: Sequence[str] = IMAGE_EXTENSIONS, page_size: int = 1000,
                retry_deadline: float = DEFAULT_RETRY_DEADLINE) -> list[str]:
    """Sorted names of the image objects under ``gs://bucket/prefix``.

    Raises FileNotFoundError for a missing bucket, ValueError when no image is found or an image
    is not inside a class directory below the prefix.
    """
    from google.api_core import exceptions as gexc

    extensions = tuple(e.lower() for e in extensions)
    where = f"gs://{bucket}/{prefix}"
    names, seen, pages = [], 0, 0
    try:
        iterator = client.list_blobs(bucket, prefix=prefix or None, page_size=page_size,
                                     fields="items(name),nextPageToken",
                                     retry=make_retry(retry_deadline, url=where))
        for page in iterator.pages:
            pages += 1
            for blob in page:
                seen += 1
                if blob.name.lower().endswith(extensions):
                    names.append(blob.name)
            log.info("listing %s: page %d, %d objects, %d images so far", where, pages, seen, len(names))
    except gexc.RetryError as e:
        raise GCSError(f"cannot list {where} at {client.api_endpoint}: still failing after {retry_deadline:g} s "
                       f"of retries (--retry-deadline); last error: {e.cause!r}") from None
    except gexc.NotFound as e:
        raise FileNotFoundError(f"bucket gs://{bucket} does not exist") from e
    except (gexc.Forbidden, gexc.Unauthorized) as e:
        raise PermissionError(f"listing gs://{bucket} denied; check the credentials' "
                              f"storage.objects.list permission") from e
    log.info("listed %d objects under %s in %d pages; %d are images", seen, where, pages,
             len(names))
    if not names:
        raise ValueError(f"no image objects under {where} ({seen} objects listed; image "
                         f"extensions are {', '.join(extensions)}); check --bucket/--prefix")
    for name in names:
        if "/" not in name[len(prefix):].lstrip("/"):
            raise ValueError(f"gs://{bucket}/{name} is not inside a class directory; expected "
                             f"the ImageFolder layout {where}<class>/<file>")
    names.sort()
    return names


def write_blob_list(names: Sequence[str], output: str, client=None,
                    retry_deadline: float = DEFAULT_RETRY_DEADLINE) -> None:
    """Write ``names`` one per line to a local path (atomically) or to ``gs://bucket/path``."""
    text = "".join(f"{n}\n" for n in names)
    if output.startswith("gs://"):
        from google.api_core import exceptions as gexc

        bucket, path = parse_gs_url(output)
        client = client or make_client()
        try:
            client.bucket(bucket).blob(path).upload_from_string(
                text, content_type="text/plain", retry=make_retry(retry_deadline, url=output))
        except gexc.NotFound as e:
            raise FileNotFoundError(f"cannot write {output}: bucket gs://{bucket} does not "
                                    f"exist") from e
        except gexc.RetryError as e:
            raise GCSError(f"cannot write {output}: still failing after {retry_deadline:g} s of retries; "
                           f"last error: {e.cause!r}") from None
        except gexc.GoogleAPICallError as e:  # e.g. 403: no storage.objects.create permission
            raise GCSError(f"cannot write {output}: {' '.join(str(e).split())[:300]}; the listing of "
                           f"{len(names)} images is not saved: give a local --output or fix the permission") from None
    else:
        write_bytes_atomically(os.path.abspath(output), text.encode("utf-8"), "the blob list",
                               kept=f"the listing of {len(names)} images is not saved: give another --output")


def generate_blob_list(bucket: str, prefix: str, output: str, client=None,
                       extensions: Sequence[str] = IMAGE_EXTENSIONS,
                       retry_deadline: float = DEFAULT_RETRY_DEADLINE) -> int:
    """List the images under ``gs://bucket/prefix`` and write the blob list to ``output``.
    Returns the number of images listed."""
    client = client or make_client()
    names = list_images(client, bucket, prefix, extensions, retry_deadline=retry_deadline)
    write_blob_list(names, output, client, retry_deadline)
    classes = {n.rsplit("/", 2)[-2] for n in names}
    log.info("wrote %d images in %d classes to %s", len(names), len(classes), output)
    return len(names)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(_main, argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generate_blob_list.py",
        description="List every image object under a Cloud Storage prefix (ImageFolder layout "
                    "<prefix><class>/<file>), sort the names and write them one per line: the "
                    "blob list that gcs.GCSImageFolder streams images from.",
        epilog="Credentials: Application Default Credentials (gcloud auth application-default "
               "login, or a service account on the cluster); anonymous access when none are "
               "found; STORAGE_EMULATOR_HOST=http://host:port targets a local emulator.")
    parser.add_argument("--bucket", required=True, help="bucket name, e.g. my-imagenet")
    parser.add_argument("--prefix", default="",
                        help="object prefix holding the class folders, e.g. train/")
    parser.add_argument("--output", required=True,
                        help="where to write the list: a local path or gs://bucket/path")
    parser.add_argument("--extensions", default=",".join(IMAGE_EXTENSIONS),
                        help="comma-separated image extensions to keep (case-insensitive); "
                             "default: %(default)s")
    parser.add_argument("--project", default=None, help="billing project (optional)")
    parser.add_argument("--anonymous", action="store_true",
                        help="use anonymous access (public buckets) instead of ADC")
    parser.add_argument("--retry-deadline", type=float, default=DEFAULT_RETRY_DEADLINE,
                        help="seconds to retry a failing request before giving up (default %(default)s)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or BYOL_DEBUG=1)")
    return parser


def _main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Every argument is checked before minutes of listing.
    if not args.bucket.strip() or args.bucket.startswith("gs://") or "/" in args.bucket:
        parser.error(f"--bucket takes a bare bucket name, e.g. my-imagenet, got {args.bucket!r}")
    if not math.isfinite(args.retry_deadline) or not args.retry_deadline > 0:
        parser.error(f"--retry-deadline must be > 0 seconds, got {args.retry_deadline}")
    extensions = [e.strip() if e.strip().startswith(".") else f".{e.strip()}"
                  for e in args.extensions.split(",") if e.strip()]
    bad = [e for e in extensions if not e[1:].isalnum()]
    if not extensions or bad:
        parser.error(f"--extensions {args.extensions!r}: expected comma-separated file extensions such as "
                     f"jpg,jpeg,png" + (f" ({', '.join(map(repr, bad))} is not one)" if bad else ""))
    if args.output.startswith("gs://"):
        try:
            parse_gs_url(args.output)
        except ValueError as error:
            parser.error(f"--output: {error}")
    elif not args.output.strip():
        parser.error("--output is empty: give a local path or gs://bucket/path")
    else:
        check_output_file(args.output, "--output")
    client = make_client(args.project, anonymous=True if args.anonymous else None)
    try:
        generate_blob_list(args.bucket, args.prefix, args.output, client, extensions, args.retry_deadline)
    except ValueError as e:  # nothing listed, or not the ImageFolder layout
        raise InputError(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
