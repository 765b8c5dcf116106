"""One Location interface, one set of tests: a local folder and a bucket on S3 pass the same.

As zarr-python's ``zarr/testing/store.py`` does for its stores, :class:`LocationTests` holds
what every :class:`~saecache.storage.location.Location` must do, and each kind of location
inherits it with a ``backend`` fixture (tests/s3.py) that reads and writes objects without
going through the Location under test. The S3 side is moto's real server on 127.0.0.1.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from saecache.core.errors import SaecacheError
from saecache.storage.location import LocalFolder, Location, UrlLocation, is_url, location_of
from tests.s3 import LocalBackend, S3Backend, free_port, s3_fixture, s3_server_fixture  # noqa: F401

PARTIAL = "resid/00/c/3/0.6f1c2a9e5b7d4c3a8e9f0a1b2c3d4e5f.partial"  # zarr's LocalStore temporary


def put(backend, location: Location, objects: dict[str, bytes]) -> None:
    for key, data in objects.items():
        backend.write(str(location), key, data)


def assert_one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


class LocationTests:
    """What every kind of location must do. A subclass sets ``kind`` and ``removes_partials``
    and gives the ``backend`` fixture."""

    kind: type[Location]
    removes_partials: bool
    """Whether :meth:`Location.clean_partials` has files to remove there."""

    @pytest.fixture
    def backend(self):
        raise NotImplementedError

    @pytest.fixture
    def location(self, backend) -> Location:
        return location_of(backend.location("cache.zarr"), backend.storage_options)

    def test_the_factory_makes_this_kind_and_keeps_the_text(self, backend, location):
        assert type(location) is self.kind
        assert str(location) == backend.location("cache.zarr")

    def test_nothing_there_does_not_exist(self, location):
        assert not location.exists()
        assert location.list("") == [] and location.size() == 0

    def test_one_object_is_enough_to_exist(self, backend, location):
        put(backend, location, {"notes.txt": b"hard work"})
        assert location.exists()
        assert location_of(str(location), backend.storage_options).exists()  # made from its text again

    def test_list_gives_every_key_under_a_prefix(self, backend, location):
        put(backend, location, {"a": b"1", "b/c": b"22", "b/d/e": b"333", "bb": b"4"})
        assert sorted(location.list("")) == ["a", "b/c", "b/d/e", "bb"]
        assert sorted(location.list("b/")) == ["b/c", "b/d/e"]
        assert location.list("nothing/") == []

    def test_size_adds_up_the_bytes_under_a_prefix(self, backend, location):
        put(backend, location, {"a": b"1", "b/c": b"22", "b/d/e": b"333", "bb": b"4444"})
        assert location.size() == 10
        assert location.size("b") == 5  # not "bb"
        assert location.size("b/d") == 3

    def test_remove_deletes_everything_and_nothing_beside_it(self, backend, location):
        sibling = location_of(backend.location("cache.zarr-old"), backend.storage_options)
        put(backend, location, {"zarr.json": b"{}", "resid/00/c/0/0": b"x" * 100})
        put(backend, sibling, {"zarr.json": b"{}"})
        location.remove()
        assert not location.exists() and backend.keys(str(location)) == []
        assert sibling.exists() and backend.keys(str(sibling)) == ["zarr.json"]

    def test_clean_partials_removes_what_a_killed_local_writer_leaves(self, backend, location):
        put(backend, location, {PARTIAL: b"half", "resid/00/c/3/1": b"whole"})
        assert location.clean_partials() == (1 if self.removes_partials else 0)
        kept = ["resid/00/c/3/1"] if self.removes_partials else [PARTIAL, "resid/00/c/3/1"]
        assert backend.keys(str(location)) == sorted(kept)
        assert location.clean_partials() == 0  # nothing left the second time

    def test_a_zarr_group_round_trips_through_the_store(self, backend, location):
        data = np.arange(12, dtype=np.float16).reshape(4, 3)  # (rows, d)
        group = zarr.create_group(location.store(read_only=False), attributes={"saecache": {"x": 1}})
        group.create_array("resid/00", shape=(4, 3), chunks=(2, 3), dtype="float16", fill_value=0)[:] = data
        assert {"zarr.json", "resid/00/zarr.json", "resid/00/c/0/0", "resid/00/c/1/0"} <= set(
            backend.keys(str(location)))
        again = zarr.open_group(location.store(read_only=True), mode="r")
        assert dict(again.attrs) == {"saecache": {"x": 1}}
        assert np.array_equal(again["resid/00"][:], data)
        assert sorted(location.list("resid/00/c/")) == ["resid/00/c/0/0", "resid/00/c/1/0"]
        assert location.size("resid/00") == sum(len(backend.read(str(location), key))
                                                for key in location.list("resid/00"))
        with pytest.raises(ValueError, match="read-only"):
            again["resid/00"][:] = 0


class TestLocalFolder(LocationTests):
    kind = LocalFolder
    removes_partials = True

    @pytest.fixture
    def backend(self, tmp_path) -> LocalBackend:
        return LocalBackend(tmp_path)

    def test_an_empty_folder_does_not_exist_and_a_file_does(self, tmp_path):
        (tmp_path / "empty").mkdir()
        (tmp_path / "file").write_text("not a folder")
        assert not location_of(str(tmp_path / "empty")).exists()
        assert location_of(str(tmp_path / "file")).exists()

    def test_a_file_url_is_the_folder(self, tmp_path):
        location = location_of(f"file://{tmp_path}/cache.zarr")
        assert isinstance(location, LocalFolder) and location.path == tmp_path / "cache.zarr"
        assert str(location) == f"file://{tmp_path}/cache.zarr"

    def test_writing_creates_the_folder_and_reading_does_not(self, tmp_path):
        location = location_of(str(tmp_path / "a" / "cache.zarr"))
        location.store(read_only=True)
        assert not (tmp_path / "a").exists()
        location.store(read_only=False)
        assert (tmp_path / "a" / "cache.zarr").is_dir() and not location.exists()


class TestS3Bucket(LocationTests):
    kind = UrlLocation
    removes_partials = False

    @pytest.fixture
    def backend(self, s3) -> S3Backend:
        return S3Backend(s3, s3.make_bucket())

    def test_storage_options_are_parsed_once_when_made(self, s3):
        location = location_of("s3://bucket/cache.zarr", {"anon": "false", "client_kwargs.region_name": "r"})
        assert location.options == {"anon": False, "client_kwargs": {"region_name": "r"}}
        with pytest.raises(SaecacheError, match="anon='maybe' is not true or false"):
            location_of("s3://bucket/cache.zarr", {"anon": "maybe"})

    def test_a_bucket_that_does_not_exist_is_one_line(self, s3):
        with pytest.raises(SaecacheError) as err:
            location_of("s3://no-such-bucket/cache.zarr").exists()
        assert_one_line(err, "bucket 'no-such-bucket' of s3://no-such-bucket/cache.zarr does not exist",
                        f"at endpoint {s3.endpoint}", "create it first")

    def test_an_endpoint_nobody_listens_on_is_one_line(self, s3, monkeypatch):
        dead = f"http://127.0.0.1:{free_port()}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
        # One attempt: botocore's default retries would take ~8 s to give up on a closed port.
        location = location_of("s3://bucket/cache.zarr", {"config_kwargs.retries.max_attempts": "1"})
        with pytest.raises(SaecacheError) as err:
            location.exists()
        assert_one_line(err, "cannot reach the object store for s3://bucket/cache.zarr", dead,
                        "AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 or --storage-option endpoint_url=…")


@pytest.mark.parametrize("text, url", [("s3://bucket/cache.zarr", True), ("gs://b/c", True),
                                       ("memory://c", True), ("/data/cache.zarr", False),
                                       ("cache.zarr", False), ("file:///data/cache.zarr", False)])
def test_is_url(text, url):
    assert is_url(text) is url
