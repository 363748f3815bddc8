"""Where shards live: a local directory or an S3-compatible bucket (`s3://bucket/prefix`), as one pyarrow
file system and a path on it, with S3's errors turned into one line a user can act on.

S3 settings come from the standard AWS environment, read the same way boto3 and the AWS CLI read them:
credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), AWS_PROFILE and
~/.aws, or an instance role; the region from AWS_REGION or AWS_DEFAULT_REGION; a non-AWS server (MinIO,
Ceph, R2, moto) from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL. pyarrow itself ignores the endpoint
variables, so they are passed to it here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from store.errors import StoreError

ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_ENVS = ("AWS_REGION", "AWS_DEFAULT_REGION")
_CREDENTIAL_ENVS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)
NO_CREDENTIALS = "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's bucket naming rules, roughly


@dataclass(frozen=True)
class Location:
    """A directory on a file system: local (`fs` a LocalFileSystem) or a prefix in an S3 bucket."""

    fs: pafs.FileSystem
    path: str  # the path on fs: a local path, or "bucket/key/prefix"
    url: str  # what to show users and hand to other processes: a local path or s3://bucket/prefix
    remote: bool

    def join(self, *parts: str) -> Location:
        joined = "/".join([self.path.rstrip("/"), *parts])
        url = "/".join([self.url.rstrip("/"), *parts]) if self.remote else joined
        return Location(self.fs, joined, url, self.remote)

    def __str__(self) -> str:
        return self.url


def is_url(where: str | Path) -> bool:
    """Whether `where` is written as a URL (scheme://...) rather than a local path."""
    return isinstance(where, str) and _URL.match(where) is not None


def locate(where: str | Path) -> Location:
    """The Location of a local path or an s3:// URL. Raises StoreError for a malformed or unsupported URL;
    nothing is contacted yet."""
    if not is_url(where):
        return Location(pafs.LocalFileSystem(), str(where), str(where), remote=False)
    scheme, rest = _URL.match(str(where)).groups()
    if scheme.lower() != "s3":
        raise StoreError(f"unsupported shard location {where}: use a local directory or s3://bucket/prefix")
    bucket, _, key = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise StoreError(
            f"bad S3 URL {where}: '{bucket}' is not a bucket name (3-63 characters: lowercase "
            "letters, digits, dots, hyphens)"
        )
    parts = [p for p in key.split("/") if p]
    path = "/".join([bucket, *parts])
    return Location(s3_filesystem(bucket), path, f"s3://{path}", remote=True)


def endpoint() -> str | None:
    """The S3 endpoint URL from the environment (None: AWS itself)."""
    return next((os.environ[k] for k in ENDPOINT_ENVS if os.environ.get(k)), None)


def s3_filesystem(bucket: str) -> pafs.S3FileSystem:
    """pyarrow's S3 file system configured from the AWS environment (see the module docstring)."""
    url = endpoint()
    region = next((os.environ[k] for k in REGION_ENVS if os.environ.get(k)), None)
    if region is None and url is None:
        try:
            region = pafs.resolve_s3_region(bucket)
        except OSError:
            region = None  # leave it to the SDK; an unreachable AWS shows up at the first request
    return pafs.S3FileSystem(region=region or "us-east-1", endpoint_override=url, connect_timeout=10)


def has_credentials() -> bool:
    """Whether the environment names any AWS credentials (an instance role can still supply them)."""
    files = [
        Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", Path.home() / ".aws" / "credentials")),
        Path(os.environ.get("AWS_CONFIG_FILE", Path.home() / ".aws" / "config")),
    ]
    return any(os.environ.get(k) for k in _CREDENTIAL_ENVS) or any(f.is_file() for f in files)


def storage_error(exc: OSError, doing: str, where: Location | str) -> StoreError:
    """One line for a failed file-system call: what failed, on what, and what to check."""
    text = str(exc)
    if "AWS Error" not in text and "curlCode" not in text:  # a local file system's error
        detail = exc.strerror if exc.strerror else (text.strip().splitlines() or [type(exc).__name__])[0]
        return StoreError(f"cannot {doing} {where}: {detail}")
    credentials = (
        "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's permissions"
        if has_credentials()
        else NO_CREDENTIALS
    )
    if any(code in text for code in ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH")):
        return StoreError(f"cannot {doing} {where}: access denied ({credentials})")
    if "NO_SUCH_BUCKET" in text:
        return StoreError(f"cannot {doing} {where}: the bucket does not exist")
    if "NETWORK_CONNECTION" in text or "curlCode" in text:
        return StoreError(
            f"cannot {doing} {where}: cannot reach the S3 endpoint {endpoint() or 'of AWS'} "
            f"({_curl_detail(text)}); check {' / '.join(ENDPOINT_ENVS)} and the network"
        )
    message = re.sub(r"\s+", " ", text.split("AWS Error", 1)[-1]).strip()
    hint = "" if has_credentials() else f" ({NO_CREDENTIALS})"  # anonymous requests fail in many ways
    return StoreError(f"cannot {doing} {where}: {message[:200]}{hint}")


def _curl_detail(text: str) -> str:
    match = re.search(r"Details: ([^\n]+)", text) or re.search(r"curlCode: \d+, ([^;\n]+)", text)
    return match.group(1).strip() if match else "connection failed"


def check_bucket(loc: Location) -> None:
    """For an S3 location, one request that proves the bucket is there and the credentials are accepted,
    so a run fails before any work instead of at its first shard. Local directories are checked by
    writing, as before."""
    if not loc.remote:
        return
    bucket = loc.path.split("/", 1)[0]
    try:
        info = loc.fs.get_file_info(bucket)
    except OSError as exc:
        raise storage_error(exc, "use", loc) from None
    if info.type == pafs.FileType.NotFound:
        raise StoreError(f"cannot use {loc}: bucket '{bucket}' does not exist (create it first)")
