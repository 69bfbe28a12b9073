"""Where a table lives and how to reach it: local or object storage, the storage options pistream adds, and
the masking of secrets in every message about storage.

Cloud tables (``s3://``, ``az://``, ``abfss://``, ``gs://``, ...) get storage-option defaults that bound a
storage outage: each request times out after 30 s and delta-rs gives up retrying after 60 s (its own default
is 180 s), so a commit stuck on unreachable storage fails within about 90 s, is logged, and is retried by the
commit writer. Options the user sets win; delta-rs also reads the standard ``AWS_*``/``AZURE_*``/``GOOGLE_*``
environment variables itself.

Storage options hold secrets (access keys, SAS tokens, client secrets). Error messages never show option
values: delta-rs echoes some (``failed to parse "..." as boolean``), so the sink masks every value of an
option that is not known to be harmless before the message leaves this module.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from urllib.parse import urlsplit
from urllib.request import url2pathname

import pyarrow.fs as pafs
from deltalake.fs import DeltaStorageHandler

# Defaults for remote tables; keys are delta-rs's (the retry keys are matched in lower case only).
REMOTE_STORAGE_DEFAULTS: dict[str, str] = {
    "timeout": "30s",  # one HTTP request (object_store's default too, made explicit)
    "connect_timeout": "10s",
    "retry_timeout": "60s",  # stop retrying one request after this; the commit writer retries the commit
}
LOCAL_SCHEMES = {"file", "memory"}

# Options whose values are configuration, never credentials, and the shape such a value has: a value of one
# of these keys that has its shape may appear in messages (endpoints help to tell what failed). Every other
# option value is masked wherever it occurs; so is a value of these keys that does not look the part, since
# delta-rs echoes a value it cannot parse (``failed to parse "..." as boolean``). Keys match in any case.
_SHAPES = {
    "bool": r"(?i:true|false|yes|no|on|off|[01])",
    "duration": r"\d+(\.\d+)?\s*[a-z]{0,4}",
    "count": r"\d{1,6}",
    "url": r"https?://[^\s@?#]+",  # no userinfo, no query string
    "name": r"[A-Za-z0-9_.-]{1,63}",
    "put_mode": r"(?i:etag|disabled|dynamo:[A-Za-z0-9_.:-]{1,255})",
}
_PUBLIC_OPTIONS: dict[str, re.Pattern[str]] = {
    key: re.compile(_SHAPES[shape])
    for shape, keys in {
        "bool": ("aws_allow_http", "allow_http", "azure_allow_http", "azure_storage_use_emulator",
                 "azure_use_emulator", "use_emulator", "azure_use_fabric_endpoint",
                 "aws_virtual_hosted_style_request", "virtual_hosted_style_request"),
        "duration": ("timeout", "connect_timeout", "retry_timeout", "pool_idle_timeout"),
        "count": ("max_retries",),
        "url": ("aws_endpoint_url", "aws_endpoint", "endpoint", "endpoint_url", "azure_storage_endpoint",
                "azure_endpoint"),
        "name": ("aws_region", "region", "aws_default_region", "azure_storage_account_name", "account_name"),
        "put_mode": ("aws_conditional_put", "conditional_put"),
    }.items()
    for key in keys
}
# Environment variables deltalake reads by itself whose values are secrets.
_SECRET_ENV = re.compile(r"^(AWS|AZURE|GOOGLE)_\w*(SECRET|KEY|TOKEN|PASSWORD|CREDENTIAL)\w*$")
MIN_MASKED = 4  # shorter values ("1", "us") are no secret, and masking them would garble the text
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def is_remote(uri: str) -> bool:
    """A table in object storage (``s3://``, ``az://``, ...), not a local path or ``file://`` URI."""
    scheme, sep, _ = uri.partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.lower() not in LOCAL_SCHEMES


def local_folder(uri: str) -> str | None:
    """The folder of a table on local disk (a path or a ``file://`` URI), or None (object storage,
    ``memory://``)."""
    scheme, sep, _ = uri.partition("://")
    if not sep or len(scheme) == 1:  # a path; "C://..." is a Windows drive
        return os.path.abspath(uri)
    if scheme.lower() == "file":
        return url2pathname(urlsplit(uri).path)
    return None


def table_files(uri: str, storage_options: Mapping[str, str] | None) -> pafs.FileSystem:
    """Where the data files of a commit are written: on local disk with Arrow's own file system, which
    streams each file out (delta-rs's object store, which the rest goes through, held each 14 MB file of a
    million rows in memory until it closed: +20-25 MB at every commit); else through delta-rs's object
    store, with the table's storage options."""
    folder = local_folder(uri)
    if folder is not None:
        return pafs.SubTreeFileSystem(folder, pafs.LocalFileSystem())
    return pafs.PyFileSystem(DeltaStorageHandler(uri, dict(storage_options or {}) or None))


def effective_storage_options(uri: str, storage_options: Mapping[str, str] | None) -> dict[str, str]:
    """The user's options, plus ``REMOTE_STORAGE_DEFAULTS`` for remote tables where the user set none."""
    options = dict(storage_options or {})
    if is_remote(uri):
        given = {key.lower() for key in options}
        for key, value in REMOTE_STORAGE_DEFAULTS.items():
            if key not in given:
                options[key] = value
    return options


def secret_values(storage_options: Mapping[str, str], environ: Mapping[str, str] | None = None) -> list[str]:
    """Values that must never appear in a message: option values other than public configuration, and
    secret cloud environment variables (which deltalake reads by itself)."""
    environ = os.environ if environ is None else environ
    values = {
        str(value) for key, value in storage_options.items()
        if (shape := _PUBLIC_OPTIONS.get(key.lower())) is None or not shape.fullmatch(str(value))
    }
    values |= {v for k, v in environ.items() if _SECRET_ENV.match(k.upper())}
    return sorted((v for v in values if len(v) >= MIN_MASKED), key=len, reverse=True)


def redact_text(text: str, secrets: list[str]) -> str:
    """``text`` on one line, without terminal colours, with every secret value replaced by ``***``."""
    text = " ".join(ANSI_ESCAPE.sub("", text).split())
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def redact_uri(uri: str) -> str:
    """The table URI without any query string or userinfo, which may hold secrets (SAS tokens)."""
    uri = uri.split("?", 1)[0]
    if "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = uri.split("://", 1)
        uri = f"{scheme}://{rest.split('@', 1)[1]}"
    return uri
