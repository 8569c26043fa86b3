"""The CRI log format the kubelet reads, written and read back."""
import asyncio

from hyperrun.sandbox.logs import LogFile, format_chunk, read, timestamp

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


def _read_all(path, **kwargs) -> list[tuple[str, bytes]]:
    async def main():
        return [pair async for output in read(str(path), **kwargs) for pair in output]
    return asyncio.run(main())


def test_read_gives_back_the_output_written(tmp_path):
    """Partial lines stay partial, each stream keeps its own; --tail counts
    entries; -t puts the time before a line's first part only."""
    path = tmp_path / "c.log"
    log = LogFile(str(path))
    for stream, data in [("stdout", b"a\nb"), ("stderr", b"err\n"), ("stdout", b"c\n")]:
        log.write(stream, data)
    log.close()
    assert _read_all(path) == [("stdout", b"a\n"), ("stdout", b"b"), ("stderr", b"err\n"),
                               ("stdout", b"c\n")]
    assert _read_all(path, tail=2) == [("stderr", b"err\n"), ("stdout", b"c\n")]
    stamped = [data for _, data in _read_all(path, timestamps=True)]
    written = [data.split(b" ", 1) for data in stamped[:3]]
    assert [text for _, text in written] == [b"a\n", b"b", b"err\n"]
    assert all(len(when) == 30 and when.endswith(b"Z") for when, _ in written)
    assert stamped[3] == b"c\n"  # the rest of the line b began: no time of its own


def test_read_of_a_log_not_written_yet(tmp_path):
    assert _read_all(tmp_path / "none.log") == []
