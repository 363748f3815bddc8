"""Fixtures: tiny random-init models with a locally trained tokenizer, saved to disk and loaded through the
same code path a user's model takes (ingest.models.load_model on a directory). Plain helpers are in
helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import FAMILIES, PROMPTS, build_model, build_tokenizer, cli_env

# The app skips Altair's schema check of its charts (dashboard.charts.VALIDATE); the tests keep it, in this
# process (AppTest) and in the apps they start.
os.environ.setdefault("BRANCHLENS_VALIDATE_CHARTS", "1")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """family -> directory holding a saved tiny model and its tokenizer (GPT-2 without BOS, others with)."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        build_model(family).save_pretrained(path)
        build_tokenizer(add_bos=family != "gpt2").save_pretrained(path)
        out[family] = path
    return out


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_cfg(model_dirs, tmp_path):
    """A factory of small RunConfigs on a tiny model, writing to a store in tmp_path."""
    from ingest.config import build_config

    def make(family: str = "llama", store: str = "store.duckdb", **overrides):
        values = dict(
            model=str(model_dirs[family]),
            prompts=list(PROMPTS),
            samples=2,
            forks=2,
            depth=1,
            max_new_tokens=12,
            layers=[0, 1, -1],
            device="cpu",
            store=str(tmp_path / store),
        )
        values.update(overrides)
        return build_config(values)

    return make


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode, from the dev extra) on a free local port, checking
    credentials as S3 does: only the access key of its one IAM user (allowed s3:*) gets in. Yields
    (endpoint URL, access key id, secret key)."""
    import json
    import logging

    import boto3
    import moto.settings
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.CRITICAL)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
    )
    iam.create_user(UserName="branchlens")
    iam.put_user_policy(
        UserName="branchlens",
        PolicyName="s3",
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        ),
    )
    key = iam.create_access_key(UserName="branchlens")["AccessKey"]
    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on every request is authenticated
    yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """A fresh bucket on the local S3 server, with the AWS environment pointing at it (in this process and
    in the subprocesses started with `s3.env`). Gives url (s3://bucket/runs), bucket, fs (a pyarrow
    S3FileSystem for looking at the objects directly), endpoint and env."""
    import types
    import uuid

    import pyarrow.fs as pafs

    endpoint, key_id, secret = s3_server
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bucket = f"bl-{uuid.uuid4().hex[:12]}"
    fs = pafs.S3FileSystem(
        endpoint_override=endpoint,
        region="us-east-1",
        access_key=key_id,
        secret_key=secret,
        allow_bucket_creation=True,
    )
    fs.create_dir(bucket)
    return types.SimpleNamespace(
        url=f"s3://{bucket}/runs", bucket=bucket, fs=fs, endpoint=endpoint, env=cli_env(tmp_path) | env
    )
