"""Prints how many inputs each property tried (see tests/property/__init__.py)."""
from tests.property import EXAMPLES, TRIED


def pytest_terminal_summary(terminalreporter):
    tried = {name: n for name, n in TRIED.items() if n}
    if not tried:
        return
    tr = terminalreporter
    tr.section("hostile inputs tried (hypothesis)")
    for name, n in sorted(tried.items()):
        tr.write_line(f"{n:9d}  {name}")
    tr.write_line(f"{sum(tried.values()):9d}  in all, {len(tried)} properties "
                  f"(HYPERRUN_FUZZ_EXAMPLES={EXAMPLES})")
