import os

# Triton chooses interpreter mode when it is imported: set it before anything imports triton.
if not os.environ.get("FTCORE_TEST_CUDA"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `train.precision = auto` caches a CPU probe under XDG_CACHE_HOME: the suite (and the runs it starts)
# gets a cache of its own, so a user's cache neither decides a test nor gets written by one
import tempfile  # noqa: E402

os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="ftcore-test-cache-")


# `--report-jsonl PATH` (bench/gpu_check.sh): one JSON line per test as it finishes, so that a part
# cut short by its cap keeps every result it had; the cap's SIGTERM ends the session like Ctrl-C
# (pytest then still reports, and the last line says "interrupted").
import json  # noqa: E402
import signal  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--report-jsonl", default=None, metavar="PATH",
                     help="append one JSON line per finished test (with the torch and triton versions first)")


class _JsonlReport:
    def __init__(self, path: str):
        import importlib.metadata

        import torch
        self.file = open(path, "a", buffering=1)  # line-buffered: each line is on disk once written
        try:
            triton = importlib.metadata.version("triton")
        except importlib.metadata.PackageNotFoundError:
            triton = None
        self._write(session="start", torch=torch.__version__, triton=triton)

    def _write(self, **record):
        self.file.write(json.dumps(record) + "\n")

    def pytest_collection_finish(self, session):
        self._write(collected=len(session.items))

    def pytest_runtest_logreport(self, report):
        # a test's outcome: its call, or a setup that skipped or failed, or a teardown that failed
        if report.when == "call" or report.outcome != "passed":
            outcome = "error" if report.when != "call" and report.failed else report.outcome
            message = str(report.longrepr).strip().splitlines()[-1][:300] if report.longrepr else ""
            self._write(test=report.nodeid, outcome=outcome, seconds=round(report.duration, 2), message=message)

    def pytest_sessionfinish(self, session, exitstatus):
        self._write(session="interrupted" if exitstatus == 2 else "finished", exitstatus=int(exitstatus))
        self.file.close()


def pytest_configure(config):
    path = config.getoption("--report-jsonl", default=None)
    if path:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        config.pluginmanager.register(_JsonlReport(path), "report-jsonl")
