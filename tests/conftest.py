"""The suite's configuration: the framework's fixtures (tests/framework),
the registry's, and the measurements a test reports."""
# The framework (fixtures that boot and always tear down, async tests) and
# the registry and test images (real docker-registry, umoci, skopeo).
pytest_plugins = ["tests.framework.fixtures", "tests.registry"]


# Measurements a test reports at the end of the run (`make test` shows them
# without -s): section title -> lines. The soak's numbers go here.
REPORTS: dict[str, list[str]] = {}


def pytest_terminal_summary(terminalreporter):
    for title, lines in REPORTS.items():
        terminalreporter.section(title)
        for line in lines:
            terminalreporter.write_line(line)
