"""Content store and image metadata: atomic, verified ingest; resume; GC data."""
import pytest

from hyperrun.image.metadata import ImageRecord, Layer, Metadata
from hyperrun.image.store import ContentStore, DigestError, StoreError, digest_bytes


def test_ingest_verifies_and_publishes_atomically(tmp_path):
    store = ContentStore(tmp_path)
    data = b"hello" * 1000
    digest = digest_bytes(data)
    with store.ingest(digest, len(data)) as ing:
        ing.write(data[:100])
        assert not store.has(digest)  # nothing unverified is visible
        ing.write(data[100:])
        ing.commit()
    assert store.read(digest) == data
    assert not any((tmp_path / "ingest").iterdir())


def test_bad_digest_is_refused_and_nothing_is_left(tmp_path):
    store = ContentStore(tmp_path)
    wrong = digest_bytes(b"something else")
    with pytest.raises(DigestError, match="digest mismatch"):
        with store.ingest(wrong, 5) as ing:
            ing.write(b"hello")
            ing.commit()
    assert not store.has(wrong)
    assert list(store.digests()) == [] and not any((tmp_path / "ingest").iterdir())
    with pytest.raises(DigestError, match="more than"):
        with store.ingest(wrong, 3) as ing:
            ing.write(b"hello")
    with pytest.raises(StoreError, match="invalid digest"):
        store.ingest("sha256:../../etc/passwd")
    with pytest.raises(StoreError, match="invalid digest"):
        store.path("md5:abc")


def test_truncated_download_resumes(tmp_path):
    store = ContentStore(tmp_path)
    data = bytes(range(256)) * 400
    digest = digest_bytes(data)
    with pytest.raises(DigestError, match="got 1000 of"):
        with store.ingest(digest, len(data)) as ing:
            ing.write(data[:1000])
            ing.commit()
    assert not store.has(digest)
    with store.ingest(digest, len(data)) as ing:
        assert ing.offset == 1000
        ing.write(data[1000:])
        ing.commit()
    assert store.read(digest) == data


def test_metadata_names_and_references(tmp_path):
    md = Metadata(tmp_path / "m.db")
    img = ImageRecord("sha256:" + "a" * 64, "application/vnd.oci.image.manifest.v1+json",
                      "sha256:" + "b" * 64, [Layer("sha256:" + "c" * 64, "x", 10)],
                      extra_blobs=["sha256:" + "d" * 64])
    md.add(img, "docker.io/library/busybox:latest", "sha256:" + "d" * 64)
    md.add(img, "docker.io/library/busybox:1", "sha256:" + "d" * 64)
    assert md.lookup("docker.io/library/busybox:1").image == img.digest
    assert md.image(img.digest).layers == img.layers
    assert md.referenced_blobs() == set(img.blobs)
    md.untag("docker.io/library/busybox:1")
    assert [n.name for n in md.names(img.digest)] == ["docker.io/library/busybox:latest"]
    md.remove_image(img.digest)
    assert md.images() == [] and md.referenced_blobs() == set() and md.names() == []
