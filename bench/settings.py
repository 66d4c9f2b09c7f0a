"""Settings of the latency benchmark's ``manage.py drain_outbox`` subprocess.

The example project's settings, with the relay publishing to the pipe whose file descriptor the
benchmark passes in ``BENCH_LATENCY_FD`` (see bench/publishers.py).
"""

import os

from example_project.settings import *  # noqa: F403
from example_project.settings import RUNS_APP as _EXAMPLE_RUNS_APP

RUNS_APP = {
    **_EXAMPLE_RUNS_APP,
    "PUBLISHER": "bench.publishers.PipePublisher",
    "PUBLISHER_OPTIONS": {"fd": int(os.environ.get("BENCH_LATENCY_FD", "-1"))},
}
