"""Settings for relay subprocesses that publish to NATS (tests/test_nats_publisher.py): the relay
test settings, with a slow NatsPublisher on the test's stream."""

import os

from tests.relay_settings import *  # noqa: F403
from tests.relay_settings import RUNS_APP as _RELAY_RUNS_APP

RUNS_APP = {
    **_RELAY_RUNS_APP,
    "PUBLISHER": "tests.nats_helpers.SlowNatsPublisher",
    "PUBLISHER_OPTIONS": {
        "servers": "nats://127.0.0.1:4222",
        "subject": os.environ["NATS_TEST_SUBJECT"],
        "stream": os.environ["NATS_TEST_STREAM"],
        "delay": float(os.environ.get("NATS_TEST_DELAY", "0")),
        "connect_timeout": 3,
    },
}
