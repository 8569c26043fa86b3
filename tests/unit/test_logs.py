"""The CRI log format the kubelet reads."""
from hyperrun.sandbox.logs import LogFile, format_chunk, timestamp

NS = 1_700_000_000_123_456_789


def test_timestamp_is_rfc3339_nano_utc():
    assert timestamp(NS) == "2023-11-14T22:13:20.123456789Z"


def test_full_and_partial_lines():
    assert format_chunk("stdout", b"a\nb\n", NS) == (
        b"2023-11-14T22:13:20.123456789Z stdout F a\n2023-11-14T22:13:20.123456789Z stdout F b\n")
    assert format_chunk("stderr", b"no newline", NS) == (
        b"2023-11-14T22:13:20.123456789Z stderr P no newline\n")
    assert format_chunk("stdout", b"end\npart", NS).split(b"\n")[:2] == [
        b"2023-11-14T22:13:20.123456789Z stdout F end",
        b"2023-11-14T22:13:20.123456789Z stdout P part"]
    assert format_chunk("stdout", b"\n", NS) == b"2023-11-14T22:13:20.123456789Z stdout F \n"


def test_logfile_appends_and_reopens(tmp_path):
    path = tmp_path / "pod" / "c.log"
    log = LogFile(str(path))
    log.write("stdout", b"one\n")
    path.rename(tmp_path / "pod" / "c.log.1")  # rotated by the kubelet
    log.reopen()
    log.write("stderr", b"two\n")
    log.close()
    assert path.read_text().endswith("stderr F two\n")
    assert (tmp_path / "pod" / "c.log.1").read_text().endswith("stdout F one\n")
