"""Print the cpp / reference / compiled ratio table after a pytest-benchmark run of bench_cpu."""
import sys


def pytest_terminal_summary(terminalreporter):
    module = sys.modules.get("bench_cpu")
    if module is None or not getattr(module, "RESULTS", None):
        return
    terminalreporter.write_sep("-", "fastmdm CPU backends: median times")
    terminalreporter.write_line(module.table(module.RESULTS))
