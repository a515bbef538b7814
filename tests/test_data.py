"""The real download and archive code against archives served over loopback HTTP."""
from __future__ import annotations

import hashlib
import http.server
import shutil
import tarfile
import threading

import numpy as np
import pytest

from cifar_archive import build_archive, build_bomb, evil_pickle, expected_arrays
from cifarpipe.data import archive as data
from cifarpipe.config import UserError


def serve(server, archive):
    shutil.copy(archive, server.root / archive.name)
    return f"{server.url}/{archive.name}"


def test_download_verifies_streams_and_reports_progress(http_server, tiny_archive, tmp_path):
    archive, md5 = tiny_archive
    url = serve(http_server, archive)
    dest = tmp_path / "out" / "c.tar.gz"
    seen = []
    assert data.download(url, dest, md5, progress=lambda done, total: seen.append((done, total))) is True
    assert dest.read_bytes() == archive.read_bytes()
    assert seen[-1] == (archive.stat().st_size, archive.stat().st_size)
    assert list(dest.parent.iterdir()) == [dest]  # no temporary left


def test_a_present_valid_archive_is_not_fetched_again(http_server, tiny_archive, tmp_path):
    archive, md5 = tiny_archive
    url = serve(http_server, archive)
    dest = tmp_path / "c.tar.gz"
    data.download(url, dest, md5)
    assert data.download(url, dest, md5) is False
    assert len(http_server.requests) == 1


def test_wrong_md5_names_both_and_leaves_nothing(http_server, tiny_archive, tmp_path):
    archive, md5 = tiny_archive
    url = serve(http_server, archive)
    dest = tmp_path / "dl" / "c.tar.gz"
    wrong = "0" * 32
    with pytest.raises(data.ChecksumError) as e:
        data.download(url, dest, wrong)
    assert f"expected md5 {wrong}, got {md5}" in str(e.value)
    assert list(dest.parent.iterdir()) == []


def test_network_failure_names_the_url_after_retries(tmp_path):
    url = "http://127.0.0.1:9/cifar.tar.gz"  # port 9 (discard): nothing listens, connection refused
    with pytest.raises(UserError) as e:
        data.download(url, tmp_path / "c.tar.gz", "0" * 32, retries=2, backoff_s=0.01)
    assert f"could not download {url}" in str(e.value) and "attempt 3 of 3" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_server_errors_are_retried_not_found_is_not(http_server, tiny_archive, tmp_path):
    archive, md5 = tiny_archive
    url = serve(http_server, archive)
    http_server.fail_next = [503]
    assert data.download(url, tmp_path / "c.tar.gz", md5, retries=1, backoff_s=0.01)
    assert len(http_server.requests) == 2
    with pytest.raises(UserError, match="attempt 1 of 3"):
        data.download(f"{http_server.url}/missing.tar.gz", tmp_path / "m.tar.gz", md5, retries=2, backoff_s=0.01)


def test_file_url_and_plain_path_work(tiny_archive, tmp_path):
    archive, md5 = tiny_archive
    assert data.download(archive.as_uri(), tmp_path / "a.tar.gz", md5)
    assert data.download(str(archive), tmp_path / "b.tar.gz", md5)


def test_arrays_match_the_pickled_images(tiny_archive):
    archive, _ = tiny_archive
    a = data.arrays_from_archive(archive)
    train_x, train_y, test_x, test_y = expected_arrays()
    assert a.train_images.shape == (500, 32, 32, 3) and a.train_images.dtype == np.uint8
    np.testing.assert_array_equal(a.train_images, train_x)
    np.testing.assert_array_equal(a.train_labels, train_y)
    np.testing.assert_array_equal(a.test_images, test_x)
    np.testing.assert_array_equal(a.test_labels, test_y)
    assert a.classes[0] == "airplane" and len(a.classes) == 10
    assert sum(data.class_counts(a.train_labels)) == 500


def test_save_and_load_round_trip(tiny_archive, tmp_path):
    a = data.arrays_from_archive(tiny_archive[0])
    data.save_arrays(a, tmp_path / "c.npz")
    b = data.load_arrays(tmp_path / "c.npz")
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.test_images, b.test_images)
    assert a.classes == b.classes
    # The stages map one part of the file instead of reading it; a compressed npz is read normally.
    images, labels, classes = data.load_part(tmp_path / "c.npz", "test")
    assert isinstance(images, np.memmap) and not images.flags.writeable
    np.testing.assert_array_equal(images, a.test_images)
    np.testing.assert_array_equal(labels, a.test_labels)
    np.savez_compressed(tmp_path / "z.npz", train_images=a.train_images, train_labels=a.train_labels,
                        test_images=a.test_images, test_labels=a.test_labels, classes=np.array(a.classes))
    images, _, _ = data.load_part(tmp_path / "z.npz", "train")
    assert not isinstance(images, np.memmap)
    np.testing.assert_array_equal(images, a.train_images)


def test_truncated_and_non_gzip_archives_are_clear_errors(tiny_archive, tmp_path):
    raw = tiny_archive[0].read_bytes()
    (tmp_path / "trunc.tar.gz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "plain.tar.gz").write_bytes(b"<html>not found</html>")
    for name in ("trunc.tar.gz", "plain.tar.gz"):
        with pytest.raises(UserError, match="truncated or not a gzip tar archive"):
            data.arrays_from_archive(tmp_path / name)


@pytest.mark.parametrize("member", ["../escape.txt", "/etc/evil", "cifar-10-batches-py/../../x"])
def test_members_escaping_the_folder_refuse_the_archive(tmp_path, member):
    info = tarfile.TarInfo(member)
    info.size = 1
    path = tmp_path / "bad.tar.gz"
    build_archive(path, extra_members=[info])
    with pytest.raises(data.UnsafeArchiveError, match="outside the target folder"):
        data.arrays_from_archive(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz"]


def test_links_refuse_the_archive(tmp_path):
    link = tarfile.TarInfo("cifar-10-batches-py/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    path = tmp_path / "link.tar.gz"
    build_archive(path, extra_members=[link])
    with pytest.raises(data.UnsafeArchiveError, match="link or special file"):
        data.arrays_from_archive(path)


def test_a_pickle_naming_a_forbidden_global_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.tar.gz"
    build_archive(path, replace={"data_batch_3": evil_pickle(marker)})
    with pytest.raises(data.UnsafeArchiveError) as e:
        data.arrays_from_archive(path)
    assert "data_batch_3" in str(e.value) and "os.system" in str(e.value)
    assert not marker.exists()
    # The same bytes through a plain unpickler would have run the command: the test is real.
    import pickle
    pickle.loads(evil_pickle(marker), encoding="bytes")
    assert marker.exists()


def test_missing_class_is_caught_on_write(tmp_path):
    a = data.arrays_from_archive(build_and_return(tmp_path))
    labels = a.train_labels.copy()
    labels[labels == 3] = 4
    with pytest.raises(UserError, match="no images of class"):
        data.check_arrays(data.Cifar10Arrays(a.train_images, labels, a.test_images, a.test_labels, a.classes))


def build_and_return(tmp_path):
    path = tmp_path / "a.tar.gz"
    build_archive(path, n_train=50, n_test=10)
    return path


def test_md5_helper_matches_hashlib(tiny_archive):
    assert data.md5_of(tiny_archive[0]) == hashlib.md5(tiny_archive[0].read_bytes()).hexdigest()


def test_labels_outside_0_to_9_are_refused_before_any_cast(tmp_path):
    from cifar_archive import py2_pickle
    import numpy as np
    bad = py2_pickle({"batch_label": "x", "labels": [256] * 10, "data": np.zeros((10, 3072), np.uint8),
                      "filenames": ["a"] * 10})
    path = tmp_path / "labels.tar.gz"
    build_archive(path, n_train=50, n_test=10, replace={"data_batch_2": bad})
    with pytest.raises(UserError, match="labels must be 0..9, found 256..256"):
        data.arrays_from_archive(path)


# ---------------------------------------------------------------- hostile archives and servers
def test_a_member_claiming_30_gb_is_refused_from_its_header(tmp_path):
    # The archive is a few hundred KB and holds none of the 30 GB its last member claims: reading
    # any of it would end in "truncated", so the size error proves nothing was read (and so that
    # memory and time stay small by construction: no timing needed).
    path = tmp_path / "bomb.tar.gz"
    build_bomb(path, claimed=30 * 10**9)
    assert path.stat().st_size < 1_000_000
    with pytest.raises(data.UnsafeArchiveError) as e:
        data.arrays_from_archive(path)
    assert str(e.value) == ("refusing archive: member 'cifar-10-batches-py/data_batch_1' claims 30,000,000,000 "
                            "bytes, more than the 41,943,040 any CIFAR-10 file needs (a data batch is about 31,000,000)")


def test_real_compressed_zeros_over_the_limit_are_refused_before_inflating(tmp_path, monkeypatch):
    # Real zeros this time (2 MB, ~2 KB compressed), against a batch limit shrunk to 1 MiB.
    monkeypatch.setattr(data, "MAX_BATCH_BYTES", 1 << 20)
    path = tmp_path / "zeros.tar.gz"
    build_bomb(path, member="test_batch", claimed=2_000_000, zeros=2_000_000)
    with pytest.raises(data.UnsafeArchiveError, match="'cifar-10-batches-py/test_batch' claims 2,000,000 bytes, "
                                                      "more than the 1,048,576"):
        data.arrays_from_archive(path)


def test_small_files_have_a_small_limit(tmp_path):
    path = tmp_path / "meta.tar.gz"
    build_bomb(path, member="batches.meta", claimed=2 << 20)
    with pytest.raises(data.UnsafeArchiveError, match="batches.meta' claims 2,097,152 bytes, more than the 1,048,576"):
        data.arrays_from_archive(path)


def test_the_number_of_members_is_bounded(tmp_path):
    # 100 empty headers: tarfile's getmembers() would walk them all (and a hostile stream can
    # hold millions); the reader stops at the 65th.
    path = tmp_path / "many.tar.gz"
    build_bomb(path, claimed=0, extra_headers=100)
    with pytest.raises(data.UnsafeArchiveError, match="more than 64 members"):
        data.arrays_from_archive(path)


def test_the_decompressed_stream_is_bounded_even_inside_a_header(tmp_path, monkeypatch):
    # A pax extended header is read whole by tarfile before any member is seen, so no header
    # check can stop it: the byte bound on the decompressed stream does (shrunk here to 1 MiB).
    monkeypatch.setattr(data, "MAX_TAR_BYTES", 1 << 20)
    path = tmp_path / "pax.tar.gz"
    build_bomb(path, member="pax", claimed=3 << 20, zeros=3 << 20, header_type=tarfile.XHDTYPE)
    with pytest.raises(data.UnsafeArchiveError, match="more than 1,048,576 bytes once decompressed"):
        data.arrays_from_archive(path)
    # and the real archive fits within the total bound: both tests above see a real limit
    monkeypatch.setattr(data, "MAX_TAR_BYTES", 20 << 20)
    build_bomb(path, member="readme.html", claimed=5, zeros=5)
    assert len(data.arrays_from_archive(path).train_labels) == 50


class _EndlessHandler(http.server.BaseHTTPRequestHandler):
    """Sends 1 MiB chunks with no Content-Length until the client hangs up (at most 64 MiB)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()  # no Content-Length: the body ends when the connection closes
        try:
            for _ in range(64):
                self.wfile.write(bytes(1 << 20))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args) -> None:
        pass


def test_an_endless_download_is_cut_off_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_DOWNLOAD_BYTES", 3 << 20)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EndlessHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/cifar.tar.gz"
    dest = tmp_path / "dl" / "c.tar.gz"
    sizes = []
    try:
        with pytest.raises(UserError) as e:
            data.download(url, dest, "0" * 32, progress=lambda done, total: sizes.append(done))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert str(e.value) == (f"refusing the download from {url}: 4,194,304 bytes arrived and the stream went on, more "
                            "than the 3,145,728-byte limit (the CIFAR-10 archive is 170,498,071 bytes); nothing was kept")
    assert max(sizes) <= 3 << 20  # nothing past the limit was written
    assert list(dest.parent.iterdir()) == []


def test_an_announced_size_over_the_limit_is_refused_before_streaming(http_server, tiny_archive, tmp_path, monkeypatch):
    archive, md5 = tiny_archive
    url = serve(http_server, archive)
    monkeypatch.setattr(data, "MAX_DOWNLOAD_BYTES", archive.stat().st_size - 1)
    dest = tmp_path / "dl" / "c.tar.gz"
    seen = []
    with pytest.raises(UserError, match=f"the source announces {archive.stat().st_size:,} bytes, more than the"):
        data.download(url, dest, md5, progress=lambda done, total: seen.append(done))
    assert seen == [] and len(http_server.requests) == 1  # not streamed, not retried
    assert list(dest.parent.iterdir()) == []
    monkeypatch.setattr(data, "MAX_DOWNLOAD_BYTES", archive.stat().st_size)  # exactly at the limit: fine
    assert data.download(url, dest, md5)
