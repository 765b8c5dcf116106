"""A cache on object storage: the same tests for a local folder and an s3:// URL.

The S3 side is moto's real server on 127.0.0.1 (tests/s3.py), reached through s3fs with the
endpoint and credentials taken from the environment, as a user's would be.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saecache.core.errors import SaecacheError
from saecache.harvest.loop import harvest
from saecache.storage import layout as names
from saecache.storage.cache import Cache
from saecache.storage.objectstore import parse_storage_options
from saecache.storage.location import location_of
from saecache.train.config import ReaderConfig
from saecache.train.loop import TrainConfig, train
from tests.conftest import harvest_config
from tests.s3 import LocalBackend, S3Backend, free_port, s3_fixture, s3_server_fixture  # noqa: F401
from tests.test_cli import assert_one_line_error, harvest_args, run

NODES = [names.TOKENS, names.SOURCE, names.BLOCK_STATS, names.COMMITTED,
         *(names.resid_name(layer) for layer in (0, 1, 2))]
TRAIN = dict(layers=(1,), expansion=2, tokens=1024, snapshots=(), log_every=4,
             checkpoint_every=512, device="cpu", progress=False,
             reader=ReaderConfig(batch_size=64, threads=2, mix_chunks=2))


def objects(backend, location) -> dict[str, bytes]:
    return {key: backend.read(location, key) for key in backend.keys(location)}


def final_snapshot(out: Path) -> dict:
    (path,) = Path(out).glob("*/sae_layer01_final.pt")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module", params=["local", "s3"])
def backend(request, tmp_path_factory):
    """Where this module's caches go: a local folder, or a fresh bucket on the S3 server."""
    if request.param == "local":
        return LocalBackend(tmp_path_factory.mktemp("caches"))
    server = request.getfixturevalue("s3")
    return S3Backend(server, server.make_bucket())


@pytest.fixture(scope="module")
def harvested(backend, cache_path, tiny_model) -> str:
    """A cache harvested on the backend with the tests' standard settings (locally: the
    session's own cache_path, harvested exactly so)."""
    if backend.name == "local":
        return str(cache_path)
    location = backend.location("cache.zarr")
    harvest(harvest_config(location, tiny_model))
    return location


@pytest.fixture(scope="module")
def reference_training(cache_path, tmp_path_factory) -> dict:
    """The final snapshot of a small run trained from the local cache."""
    out = tmp_path_factory.mktemp("reference-runs")
    train(TrainConfig(cache=str(cache_path), out=str(out), **TRAIN))
    return final_snapshot(out)


class TestEveryStore:
    """What a cache must do wherever it lives (STYLE point 7)."""

    def test_harvest_writes_the_same_objects_as_a_local_harvest(self, backend, harvested, cache_path):
        local = objects(LocalBackend(cache_path.parent), str(cache_path))
        assert objects(backend, harvested) == local  # every key, byte for byte

    def test_arrays_read_back_equal_the_local_cache(self, harvested, cache_path):
        cache, reference = Cache.open(harvested), Cache.open(str(cache_path))
        assert cache.meta == reference.meta
        for name in NODES:
            assert cache.array(name)[:].tobytes() == reference.array(name)[:].tobytes(), name

    def test_info_describes_it_as_the_local_cache(self, harvested, cache_path):
        result = run("info", harvested, "--json")
        assert result.exit_code == 0, result.output
        info, reference = json.loads(result.output), json.loads(run("info", cache_path, "--json").output)
        assert info.pop("location") == harvested
        reference.pop("location")
        assert info == reference  # bytes on disk included
        assert "8/8 blocks" in run("info", harvested).output

    def test_verify_passes(self, harvested):
        result = run("verify", harvested)
        assert result.exit_code == 0, result.output
        assert result.output.strip().endswith("ok") and "read 56 chunks" in result.output

    def test_training_equals_training_from_the_local_cache(self, harvested, reference_training, tmp_path):
        runs = train(TrainConfig(cache=harvested, out=str(tmp_path), **TRAIN))
        assert json.loads(runs[0].folder.config.read_text())["cache_location"] == harvested
        snapshot = final_snapshot(tmp_path)
        for name, tensor in reference_training.items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(snapshot[name], tensor), name

    def test_a_flipped_byte_fails_verify_naming_the_chunk(self, backend, cache_path):
        location = backend.copy_in(cache_path, "flipped.zarr")
        data = bytearray(backend.read(location, "resid/01/c/3/0"))
        data[1000] ^= 0x10
        backend.write(location, "resid/01/c/3/0", bytes(data))
        result = run("verify", location)
        assert result.exit_code != 0
        assert "resid/01 chunk (3, 0)" in result.output and "checksum" in result.output.lower()

    def test_a_missing_chunk_fails_verify(self, backend, cache_path):
        location = backend.copy_in(cache_path, "missing.zarr")
        backend.delete(location, "tokens/c/2/0")
        result = run("verify", location)
        assert result.exit_code != 0 and "tokens chunk (2, 0): missing" in result.output

    def test_resume_after_a_crash_ends_identical(self, backend, cache_path, tiny_model):
        """The state a crash leaves: the last blocks' commits missing, one of their chunks
        never written, another holding other bytes; the cache not marked complete."""
        location = backend.copy_in(cache_path, "crashed.zarr")
        for block in (6, 7):
            backend.delete(location, f"blocks/committed/c/{block}")
        backend.delete(location, "resid/02/c/7/0")
        stale = backend.read(location, "resid/01/c/6/0")
        backend.write(location, "resid/01/c/6/0", bytes(len(stale)))
        cache = Cache.open(location, writable=True)
        cache._update(complete=False, stats={})  # the header rewritten with its checksum
        assert json.loads(run("info", location, "--json").output)["progress"]["blocks_committed"] == 6

        result = run(*harvest_args(location, tiny_model))
        assert result.exit_code == 0, result.output
        assert objects(backend, location) == objects(LocalBackend(cache_path.parent), str(cache_path))
        assert run("verify", location).exit_code == 0

    def test_overwrite_never_deletes_what_is_not_a_cache(self, backend, tiny_model):
        location = backend.location("thesis")
        backend.write(location, "chapter1.tex", b"hard work")
        result = run(*harvest_args(location, tiny_model), "--overwrite")
        assert_one_line_error(result, "not a saecache cache")
        assert backend.read(location, "chapter1.tex") == b"hard work"

    def test_remove_deletes_every_object_of_a_cache(self, backend, cache_path):
        location = backend.copy_in(cache_path, "doomed.zarr")
        assert location_of(location).exists()
        Cache.remove(location)
        assert not location_of(location).exists() and backend.keys(location) == []

    def test_a_zarr_group_that_is_not_a_cache_is_one_line(self, backend):
        location = backend.location("other-group.zarr")
        backend.write(location, "zarr.json", b'{"zarr_format": 3, "node_type": "group", "attributes": {}}')
        assert_one_line_error(run("info", location), f"{location} is a zarr group but not a saecache cache")

    def test_nothing_there_is_one_line(self, backend):
        location = backend.location("nothing.zarr")
        assert_one_line_error(run("info", location), f"no saecache cache at {location}")


# ---- S3 only: where the endpoint and credentials come from, and what failures look like ----


@pytest.fixture(scope="module")
def uploaded(s3, cache_path) -> str:
    """A copy of the local cache in a bucket of its own."""
    return S3Backend(s3, s3.make_bucket()).copy_in(cache_path, "cache.zarr")


@pytest.mark.parametrize("source", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "endpoint_url",
                                    "client_kwargs.endpoint_url"])
def test_the_endpoint_can_come_from_each_usual_place(s3, uploaded, monkeypatch, source):
    """Each source wins over AWS_ENDPOINT_URL, which points where nobody listens (and never
    at AWS: no request may leave 127.0.0.1)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    options = []
    if source.startswith("AWS_"):
        monkeypatch.setenv(source, s3.endpoint)
    else:
        options = ["--storage-option", f"{source}={s3.endpoint}"]
    result = run("info", uploaded, "--json", *options, "--storage-option",
                 "config_kwargs.retries.max_attempts=1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["progress"]["complete"]


def test_credentials_can_be_storage_options(s3, uploaded, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    result = run("verify", uploaded, "--storage-option", "key=testing", "--storage-option",
                 "secret=testing", "--storage-option", "anon=false")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", ["info", "verify", "train", "harvest"])
def test_a_bucket_that_does_not_exist_is_one_line(s3, tiny_model, tmp_path, command):
    location = "s3://no-such-bucket/cache.zarr"
    args = {"info": ["info", location], "verify": ["verify", location],
            "train": ["train", location, "--layer", "1", "--out", tmp_path / "runs", "--device", "cpu"],
            "harvest": harvest_args(location, tiny_model)}[command]
    assert_one_line_error(run(*args), "bucket 'no-such-bucket'", "does not exist", s3.endpoint)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["info", "harvest"])
def test_an_endpoint_nobody_listens_on_is_one_line(s3, tiny_model, monkeypatch, command):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    location = "s3://bucket/cache.zarr"
    args = ["info", location] if command == "info" else harvest_args(location, tiny_model)
    # One attempt: botocore's default retries would take ~8 s to give up on a closed port.
    result = run(*args, "--storage-option", "config_kwargs.retries.max_attempts=1")
    assert_one_line_error(result, "cannot reach the object store", dead, "AWS_ENDPOINT_URL")


@pytest.mark.parametrize("how", ["environment", "storage option", "unknown key"])
def test_refused_credentials_are_one_line(s3, uploaded, monkeypatch, how):
    bucket = uploaded.split("/")[2]
    with s3.enforced_auth() as (key_id, secret):
        # The server checks signatures now, and this key is good (boto3 signs with it) ...
        s3.client(aws_access_key_id=key_id, aws_secret_access_key=secret).head_bucket(Bucket=bucket)
        # ... but saecache is given a wrong secret, or a key the server does not know.
        options = []
        if how == "environment":
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + secret)
        elif how == "storage option":
            options = ["--storage-option", f"key={key_id}", "--storage-option", f"secret=wrong-{secret}"]
        result = run("info", uploaded, *options)
    assert_one_line_error(result, f"access to {uploaded} was refused", "AWS_SECRET_ACCESS_KEY")


def test_no_credentials_at_all_is_one_line(s3, uploaded, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert_one_line_error(run("info", uploaded), "no credentials found", "anon=true")


@pytest.mark.parametrize("option, needle", [("anon=maybe", "anon='maybe' is not true or false"),
                                            ("max_concurrency=many", "is not an integer"),
                                            ("client_kwargs={oops", "is not valid JSON")])
def test_a_bad_storage_option_is_one_line(s3, uploaded, option, needle):
    assert_one_line_error(run("info", uploaded, "--storage-option", option), needle)


def test_an_unknown_protocol_is_one_line():
    assert_one_line_error(run("info", "nosuch://bucket/cache.zarr"), "Protocol not known", "fsspec URL")


# ---- --storage-option strings to fsspec options (no server) ---------------------------------


def test_storage_option_strings_become_what_s3fs_expects():
    pytest.importorskip("s3fs")
    parsed = parse_storage_options("s3://b/c", {
        "anon": "false", "use_ssl": "True", "max_concurrency": "4", "default_block_size": "1048576",
        "endpoint_url": "http://127.0.0.1:9000", "client_kwargs.region_name": "eu-west-1",
        "config_kwargs.retries.max_attempts": "1", "key": "12345", "secret": "true",
        "s3_additional_kwargs": '{"ServerSideEncryption": "AES256"}',
    })
    assert parsed == {
        "anon": False, "use_ssl": True, "max_concurrency": 4, "default_block_size": 1048576,
        "endpoint_url": "http://127.0.0.1:9000", "client_kwargs": {"region_name": "eu-west-1"},
        "config_kwargs": {"retries": {"max_attempts": 1}}, "key": "12345", "secret": "true",
        "s3_additional_kwargs": {"ServerSideEncryption": "AES256"},
    }


def test_typed_storage_options_pass_unchanged():
    options = {"anon": True, "client_kwargs": {"endpoint_url": "http://x"}, "client_kwargs.region_name": "r"}
    assert parse_storage_options("s3://b/c", options) == {
        "anon": True, "client_kwargs": {"endpoint_url": "http://x", "region_name": "r"}}


@pytest.mark.parametrize("options", [{"client_kwargs": "x", "client_kwargs.region_name": "r"},
                                     {"client_kwargs.region_name": "r", "client_kwargs": "x"}])
def test_a_key_given_as_value_and_as_group_is_refused(options):
    with pytest.raises(SaecacheError, match="client_kwargs is given as a value and as a group"):
        parse_storage_options("s3://b/c", options)

