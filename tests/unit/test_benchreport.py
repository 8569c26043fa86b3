"""The bench's report: the table, the Markdown page, the plot, README's copy."""
from __future__ import annotations

import pytest

from hyperrun import benchreport

MACHINE = {"date": "2026-11-26T15:00+00:00", "cpu": "AMD EPYC", "cores": 2, "memory_gib": 23.5,
           "accelerator": "tcg", "kernel": "6.1.0", "qemu": "QEMU emulator version 7.2.22",
           "runc": "runc version 1.1.5", "python": "3.11.7", "hyperrun_commit": "abc1234",
           "loadavg_start": [1.0, 1.0, 1.0], "loadavg_end": [2.0, 1.5, 1.0]}


def variant(what, median, runc, pss, cold=None, ratio=None):
    v = {"what": what, "median_s": median, "runs_s": [median], "ratio_runc": runc, "pss_mib": pss}
    if cold:
        v.update(cold=cold, ratio_cold=ratio)
    return v


RESULT = {"machine": MACHINE, "start": {"runs": 1, "variants": {
    "runc": variant("runc run", 0.04, 1.0, 10.2),
    "floor": variant("floor", 0.65, 16.3, None, "cold", 0.24),
    "cold": variant("run IMAGE", 2.69, 67.0, 162.5, "cold", 1.0),
    "rootfs-cold": variant("run --rootfs", 3.62, 90.0, 156.0, "rootfs-cold", 1.0),
    "rootfs-template": variant("run --template --rootfs", 2.84, 71.0, 102.3, "rootfs-cold", 0.78),
}}, "cri": {"exec_sync_median_ms": 62.0}}


def test_table_rows():
    rows = benchreport.table(RESULT["start"]).splitlines()
    assert rows[0].startswith("| variant |") and len(rows) == 2 + 5
    runc, floor, cold, _, tpl = rows[2:]
    assert "| 40 ms | 1.0 | — | 10.2 MiB |" in runc
    assert "| 650 ms | 16 | 0.24 | — |" in floor
    assert "| 2.69 s | 67 | — | 162.5 MiB |" in cold  # no ratio of cold to itself
    assert "| 0.78 (of rootfs-cold) |" in tpl


def test_markdown_header_and_notes():
    page = benchreport.markdown(RESULT)
    for text in ("| accelerator | TCG |", "| runc | runc version 1.1.5 |", "commit abc1234",
                 "[1.0, 1.0, 1.0] at start", "No pool column", "## The other sections",
                 '"exec_sync_median_ms": 62.0'):
        assert text in page


def test_readme_copy_between_markers(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{benchreport.README_BEGIN}\nold table\n{benchreport.README_END}\nafter\n")
    monkeypatch.setattr(benchreport, "REPO", tmp_path)
    assert benchreport._refresh_readme("| new |\n", "2026-11-26") == readme
    text = readme.read_text()
    assert "old table" not in text and "| new |" in text
    assert text.startswith("intro\n") and text.endswith("after\n")


def test_write_files(tmp_path):
    pytest.importorskip("matplotlib")
    written = benchreport.write(RESULT, tmp_path / "bench")
    assert [p.name for p in written] == ["results.json", "results.md", "start.png"]
    assert (tmp_path / "bench" / "start.png").read_bytes()[:4] == b"\x89PNG"
