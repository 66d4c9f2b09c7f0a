"""Settings for relay subprocesses started by the tests: the example project's, with the
recording publisher and timings taken from the environment."""

import os

from example_project.settings import *  # noqa: F403

RUNS_APP = {
    "PUBLISHER": os.environ.get(
        "RELAY_TEST_PUBLISHER", "tests.recording_publisher.RecordingPublisher"
    ),
    "PUBLISHER_OPTIONS": {
        "directory": os.environ.get("RELAY_TEST_DIR", "."),
        "delay": float(os.environ.get("RELAY_TEST_DELAY", "0")),
        "fail_runs": [run for run in os.environ.get("RELAY_TEST_FAIL_RUNS", "").split(",") if run],
    },
    "LEASE_SECONDS": float(os.environ.get("RELAY_TEST_LEASE_SECONDS", "60")),
    "POLL_INTERVAL": float(os.environ.get("RELAY_TEST_POLL_INTERVAL", "0.05")),
    "DRAIN_BATCH_SIZE": int(os.environ.get("RELAY_TEST_BATCH_SIZE", "100")),
    "RETRY_BASE_SECONDS": 0.01,
    "RETRY_MAX_SECONDS": 0.02,
    "MAX_ATTEMPTS": 3,
    "NOTIFY": os.environ.get("RELAY_TEST_NOTIFY", "1") == "1",
}
