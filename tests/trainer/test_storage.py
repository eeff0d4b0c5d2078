"""Storage: LocalStore and S3Store behave the same; retries back off and give up clearly."""

from __future__ import annotations

import pytest

from lora_trainer.io import storage
from lora_trainer.io.storage import LocalStore, NotFound, RetryingStore, S3Store, StorageError


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.cluster)])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "bucket", uri_base="s3://bucket")
    s3 = request.getfixturevalue("s3")
    s3.client.make_bucket(s3.bucket)
    return S3Store(s3.client, s3.bucket)


def test_store_round_trips_files_bytes_and_prefixes(store, tmp_path):
    store.put_bytes("a/b/x.json", b"{}")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "one.txt").write_text("1")
    (src / "sub" / "two.txt").write_text("2")
    keys = storage.upload_dir(store, src, "a/dir", last=["one.txt"])
    assert keys[-1] == "a/dir/one.txt"
    assert store.get_bytes("a/b/x.json") == b"{}"
    assert store.list("a") == ["a/b/x.json", "a/dir/one.txt", "a/dir/sub/two.txt"]
    assert store.list("a/dir/sub/two.txt") == ["a/dir/sub/two.txt"]
    assert store.list("nope") == []
    assert store.exists("a/dir/one.txt") and not store.exists("a/dir")
    got = storage.download_prefix(store, "a/dir", tmp_path / "dst")
    assert sorted(p.relative_to(tmp_path / "dst").as_posix() for p in got) == ["one.txt", "sub/two.txt"]
    store.get_file("a/dir/sub/two.txt", tmp_path / "f")
    assert (tmp_path / "f").read_text() == "2"
    store.delete_prefix("a/dir")
    assert store.list("a") == ["a/b/x.json"]
    with pytest.raises(NotFound):
        store.get_bytes("a/missing")
    assert storage.fingerprint_dir(src) == storage.fingerprint_dir(tmp_path / "dst")


class Flaky:
    """Wraps a store; the first `failures` calls of `op` raise ConnectionError."""

    def __init__(self, inner, op: str, failures: int):
        self.inner, self.op, self.left, self.calls = inner, op, failures, 0

    def __getattr__(self, name):
        real = getattr(self.inner, name)
        if name != self.op:
            return real

        def call(*a):
            self.calls += 1
            if self.left > 0:
                self.left -= 1
                raise ConnectionError("connection reset by peer")
            return real(*a)

        return call


def test_retries_back_off_exponentially_then_succeed(tmp_path):
    sleeps = []
    flaky = Flaky(LocalStore(tmp_path), "put_bytes", failures=3)
    store = RetryingStore(flaky, attempts=5, base_delay=0.5, max_delay=1.5, sleep=sleeps.append)
    store.put_bytes("k", b"v")
    assert (tmp_path / "k").read_bytes() == b"v"
    assert sleeps == [0.5, 1.0, 1.5] and flaky.calls == 4


def test_retries_give_up_with_a_clear_message(tmp_path):
    flaky = Flaky(LocalStore(tmp_path, uri_base="s3://b"), "put_file", failures=99)
    store = RetryingStore(flaky, attempts=3, sleep=lambda s: None)
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match=r"put_file s3://b/ck/f failed after 3 attempts: "
                                           r"ConnectionError"):
        store.put_file("ck/f", tmp_path / "f")
    assert flaky.calls == 3


def test_not_found_is_an_answer_not_retried(tmp_path):
    sleeps = []
    with pytest.raises(NotFound):
        RetryingStore(LocalStore(tmp_path), sleep=sleeps.append).get_bytes("missing")
    assert sleeps == []


def test_uris_map_to_local_directories(tmp_path, monkeypatch):
    monkeypatch.delenv("S3_ENDPOINT", raising=False)
    (tmp_path / "bucket").mkdir()  # a bucket stand-in must exist, as the bucket must on S3
    store, key = storage.open_uri("s3://bucket/a/b.jsonl", storage_dir=tmp_path)
    store.put_bytes(key, b"x")
    assert (tmp_path / "bucket" / "a" / "b.jsonl").read_bytes() == b"x" and key == "a/b.jsonl"
    assert store.describe(key) == "s3://bucket/a/b.jsonl"
    assert store.local_path(key) is None  # a bucket stand-in is downloaded from, as S3 would be
    store, key = storage.open_uri("pvc://claim/models/x", pvc_root=tmp_path)
    assert store.local_path(key) == tmp_path / "claim" / "models" / "x"
    store, key = storage.open_uri("file:///abs/path")
    assert store.local_path(key) == storage.Path("/abs/path")
    with pytest.raises(StorageError, match="no S3 endpoint"):
        storage.open_uri("s3://bucket/k", s3_endpoint=None)


def test_copy_within_a_store_and_a_missing_source_is_not_found(store):
    store.put_bytes("staging/x", b"payload")
    store.copy("staging/x", "final/x")
    assert store.get_bytes("final/x") == b"payload" and store.exists("staging/x")
    with pytest.raises(NotFound):
        store.copy("staging/missing", "final/y")


def test_open_uri_retries_with_the_runtime_policy(tmp_path, monkeypatch):
    from lora_trainer.config import RuntimeConfig

    rt = RuntimeConfig(storage_dir=tmp_path, retry_attempts=2, retry_base_delay_s=0.0)
    store, _ = storage.open_uri("s3://bucket/k", **rt.store_kwargs())
    flaky = Flaky(store.inner, "put_bytes", failures=2)
    store.inner = flaky
    with pytest.raises(StorageError, match="failed after 2 attempts"):
        store.put_bytes("k", b"v")
    assert flaky.calls == 2


def test_fingerprint_covers_names_and_contents(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a").write_text("1")
    (tmp_path / "m" / ".scratch").write_text("ignored")
    fp = storage.fingerprint_dir(tmp_path / "m")
    assert fp.startswith("sha256:") and len(fp) == 71
    (tmp_path / "m" / "a").rename(tmp_path / "m" / "b")
    assert storage.fingerprint_dir(tmp_path / "m") != fp


def test_retries_stop_when_the_time_budget_is_spent(tmp_path):
    now = [0.0]
    sleeps = []

    def sleep(s):
        sleeps.append(s)
        now[0] += s

    flaky = Flaky(LocalStore(tmp_path, uri_base="s3://b"), "put_bytes", failures=99)
    store = RetryingStore(flaky, attempts=100, base_delay=1.0, max_delay=30.0, budget_s=120.0,
                          sleep=sleep, clock=lambda: now[0])
    with pytest.raises(StorageError, match="failed after 8 attempts"):
        store.put_bytes("k", b"v")
    assert sleeps == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0] and sum(sleeps) <= 120.0


def test_permanent_refusals_are_not_retried(tmp_path):
    class NoBucket(Exception):
        code = "NoSuchBucket"

    class Refusing:
        def describe(self, key):
            return f"s3://gone/{key}"

        def put_bytes(self, key, data):
            raise NoBucket("The specified bucket does not exist")

    sleeps = []
    with pytest.raises(StorageError, match="put_bytes s3://gone/k permanent: NoBucket"):
        RetryingStore(Refusing(), sleep=sleeps.append).put_bytes("k", b"v")
    assert sleeps == []


def test_a_storage_dir_bucket_must_exist_like_an_s3_bucket(tmp_path):
    store, key = storage.open_uri("s3://missing/job/x", storage_dir=tmp_path)
    with pytest.raises(StorageError, match="permanent: BucketMissing: NoSuchBucket: s3://missing"):
        store.put_bytes(key, b"v")
    assert not (tmp_path / "missing").exists()
