"""End to end through a real server: publish in-process, read over HTTP."""

import numpy as np
import pytest

from ndrelay import RelayClient, RemoteError

pytestmark = [pytest.mark.e2e, pytest.mark.backends]


def test_publish_and_stream_with_producer_error(server):
    def source():
        for i in range(3):
            yield np.full((2, 2), i, np.float32)
        raise ValueError("sensor broke")

    server.relay.publish("s", source())
    got = []
    with RelayClient(server.url) as client:
        with pytest.raises(ValueError, match="sensor broke") as info:
            for item in client.stream("s"):
                got.append(item)
    assert isinstance(info.value, RemoteError)
    assert [int(a[0, 0]) for a in got] == [0, 1, 2]
