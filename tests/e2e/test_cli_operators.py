"""The operators' commands (`ls`, `info`, `rm`, `cat`, `record`, `play`, `push`) as
subprocesses against real servers on 127.0.0.1: output, exit codes (0 done, 1 relay
error, 2 usage), recordings that round-trip byte for byte, Ctrl-C leaving whole frames."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from _sources import ServeProcess, clean_env, endless_large, free_port, ndrelay_cmd, poll

from ndrelay import FrameDecoder, RelayClient
from ndrelay._frames import DataFrame, EndFrame, ErrorFrame
from ndrelay.cli.demo import publish_demo

pytestmark = [pytest.mark.e2e, pytest.mark.backends]


def run(*args, url, env=None, timeout=60, **kwargs):
    return subprocess.run(
        ndrelay_cmd(*args),
        env=clean_env(NDRELAY_URL=url, **(env or {})),
        capture_output=True,
        timeout=timeout,
        **kwargs,
    )


def frames_of(data: bytes) -> list:
    decoder = FrameDecoder()
    decoder.feed(data)
    frames = list(decoder.frames())
    decoder.feed_eof()  # raises if the data stops inside a frame
    return frames


def one_line(stderr: bytes) -> str:
    text = stderr.decode().strip()
    assert len(text.splitlines()) == 1, text
    assert "Traceback" not in text
    return text


def arrays(n, shape=(3,)):
    return [np.full(shape, i, dtype=np.float32) for i in range(n)]


# -- ls, info, rm -------------------------------------------------------------------------


def test_ls_table_and_json_match_the_relay(server):
    server.relay.publish("alpha", iter(arrays(3)), size=8)
    server.relay.publish("beta", iter([b"x"] * 2), size=4, mode="fanout")
    poll(lambda: server.info("alpha")["state"] == "ended", "alpha ends")
    out = run("ls", url=server.url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    header = lines[0].split()
    assert header[:5] == ["name", "mode", "state", "depth/size", "produced"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["alpha"][1:5] == ["queue", "ended", "3/8", "3"]
    assert rows["beta"][1] == "fanout"

    listed = json.loads(run("ls", "--json", url=server.url).stdout)
    relay = httpx.get(server.url + "/streams").json()
    static = ("name", "mode", "size", "state", "produced", "depth", "consumers")
    assert [{k: s[k] for k in static} for s in listed] == [{k: s[k] for k in static} for s in relay]
    assert all({"items_per_s", "bytes_per_s"} <= s.keys() for s in listed)


@pytest.fixture
def demo(server):
    """A server with the demo streams of `ndrelay serve --demo` (in-process: its port is
    bound once, no other process can take it meanwhile)."""
    publish_demo(server.relay)
    return server


def test_ls_shows_rates_of_a_flowing_stream(demo):
    proc = demo

    def camera_rate():
        out = run("ls", "--json", url=proc.url)
        rates = {s["name"]: s for s in json.loads(out.stdout)}
        return rates["camera"]["items_per_s"] and rates["camera"]

    camera = poll(camera_rate, "a camera rate", deadline=20)
    assert 0 < camera["items_per_s"] < 20  # the demo camera runs at 10 Hz
    assert camera["bytes_per_s"] == pytest.approx(camera["items_per_s"] * 240 * 320 * 3, rel=1e-3)
    table = run("ls", url=proc.url).stdout.decode()
    row = next(line.split() for line in table.splitlines() if line.startswith("camera"))
    assert float(row[6]) > 0 and float(row[7]) > 0  # items/s, MB/s


def test_info_and_rm(server):
    server.relay.publish("gone", iter(arrays(2)), size=8)
    out = run("info", "gone", url=server.url)
    assert out.returncode == 0
    fields = dict(line.split(None, 1) for line in out.stdout.decode().splitlines())
    assert fields["name"] == "gone" and fields["mode"] == "queue" and fields["size"] == "8"
    got = json.loads(run("info", "gone", "--json", url=server.url).stdout)
    assert got["name"] == "gone" and got["produced"] == 2

    out = run("rm", "gone", url=server.url)
    assert out.returncode == 0 and "deleted gone" in out.stderr.decode()
    assert httpx.get(server.url + "/streams/gone/info").status_code == 404
    for cmd in ("info", "rm", "cat"):
        out = run(cmd, "gone", url=server.url)
        assert out.returncode == 1
        assert "no stream 'gone'" in one_line(out.stderr)


# -- errors ---------------------------------------------------------------------------------


def test_unreachable_relay_is_one_line_and_exit_1():
    url = f"http://127.0.0.1:{free_port()}"
    for args in (("ls",), ("info", "x"), ("cat", "x"), ("record", "x", "/dev/null")):
        out = run(*args, url=url)
        assert out.returncode == 1, args
        assert f"cannot reach the relay at {url}" in one_line(out.stderr)


def test_wrong_or_missing_token_is_one_line_and_exit_1(serve):
    server = serve(token="s3cret")
    for env in ({}, {"NDRELAY_TOKEN": "wrong"}):
        out = run("ls", url=server.url, env=env)
        assert out.returncode == 1
        assert "refused the token (401)" in one_line(out.stderr)
    ok = run("ls", "--json", url=server.url, env={"NDRELAY_TOKEN": "s3cret"})
    assert ok.returncode == 0 and json.loads(ok.stdout) == []
    ok = run("ls", "--json", "--token", "s3cret", url=server.url)
    assert ok.returncode == 0


def test_usage_errors_exit_2(server):
    assert run("cat", url=server.url).returncode == 2  # NAME missing
    assert run("cat", "x", "-n", "0", url=server.url).returncode == 2
    out = run("ls", "--url", "ftp://x", url=server.url)
    assert out.returncode == 2 and "relay URL must be" in out.stderr.decode()
    out = run("ls", "--json", "--url", server.url.removeprefix("http://"), url=server.url)
    assert out.returncode == 0  # http:// is assumed
    assert run("play", "/no/such/file", "x", url=server.url).returncode == 2


# -- cat ----------------------------------------------------------------------------------


def test_cat_writes_ndjson_until_the_end(server):
    server.relay.publish("nums", iter(arrays(4)), size=8)
    out = run("cat", "nums", url=server.url)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert [f["kind"] for f in lines] == ["data"] * 4 + ["end"]
    assert [f["data"] for f in lines[:4]] == [[i, i, i] for i in range(4)]


def test_cat_n_stops_after_n_items_of_an_endless_stream(demo):
    out = run("cat", "radar", "-n", "3", url=demo.url)
    assert out.returncode == 0
    lines = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert len(lines) == 3 and all(f["shape"] == [4, 8] for f in lines)
    seqs = [f["seq"] for f in lines]
    assert seqs == list(range(seqs[0], seqs[0] + 3))


def test_cat_msgpack_is_the_stream_body(server):
    server.relay.publish("raw", iter([*arrays(2), b"bytes!"]), size=8)
    out = run("cat", "raw", "--format", "msgpack", url=server.url)
    assert out.returncode == 0
    frames = frames_of(out.stdout)
    assert [type(f) for f in frames] == [DataFrame, DataFrame, DataFrame, EndFrame]
    assert frames[2].data == b"bytes!"
    np.testing.assert_array_equal(frames[1].data, arrays(2)[1])


def test_cat_of_a_failed_stream_prints_the_error_frame_and_exits_1(server):
    def broken():
        yield np.zeros(2)
        raise ValueError("lidar disconnected")

    server.relay.publish("broken", broken(), size=8)
    out = run("cat", "broken", url=server.url)
    assert out.returncode == 1
    lines = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert [f["kind"] for f in lines] == ["data", "error"]
    err = one_line(out.stderr)
    assert "ValueError: lidar disconnected" in err and "producer" in err


def test_cat_stats_prints_rates_not_frames(server):
    server.relay.publish("many", iter(arrays(500, (256,))), size=64)
    out = run("cat", "many", "--stats", url=server.url)
    assert out.returncode == 0
    assert out.stdout == b""
    assert "many: 500 items, 0.51 MB" in out.stderr.decode()


# -- record, play -------------------------------------------------------------------------


def test_record_play_record_is_byte_equal(server, tmp_path):
    items = [*arrays(5, (2, 3)), b"\x00\x01raw", np.arange(6, dtype=">i2").reshape(3, 2)]
    server.relay.publish("src", iter(items), size=16)
    first, second = tmp_path / "first.msgpack", tmp_path / "second.msgpack"
    out = run("record", "src", str(first), url=server.url)
    assert out.returncode == 0, out.stderr
    summary = one_line(out.stderr)  # quiet when stderr is no terminal: only the summary
    assert "recorded 7 items" in summary and "end of stream" in summary
    frames = frames_of(first.read_bytes())
    assert len(frames) == 8 and isinstance(frames[-1], EndFrame)
    times = [float(t) for t in Path(str(first) + ".times").read_text().split()]
    assert len(times) == 8 and times == sorted(times)

    out = run("play", str(first), "copy", url=server.url)
    assert out.returncode == 0, out.stderr
    assert "played 7 items" in one_line(out.stderr)
    out = run("record", "copy", str(second), url=server.url)
    assert out.returncode == 0
    assert second.read_bytes() == first.read_bytes()

    # and the recording is a stream body curl uploads as it is
    upload = httpx.post(server.url + "/streams/curlcopy", content=first.read_bytes())
    assert upload.json()["items"] == 7
    with RelayClient(server.url) as client:
        got = list(client.stream("curlcopy"))
    assert got[5] == b"\x00\x01raw"
    np.testing.assert_array_equal(got[6], items[6])


def test_ctrl_c_during_record_leaves_whole_frames(server, tmp_path):
    endless_large(server.relay)
    proc = server
    path = tmp_path / "big.msgpack"
    rec = subprocess.Popen(
        ndrelay_cmd("record", "endless-large", str(path)),
        env=clean_env(NDRELAY_URL=proc.url),
        stderr=subprocess.PIPE,
    )
    try:
        poll(lambda: path.exists() and path.stat().st_size > 8 << 20, "8 MiB recorded", 30)
        rec.send_signal(signal.SIGINT)
        _, err = rec.communicate(timeout=30)
    finally:
        if rec.poll() is None:
            rec.kill()
            rec.wait(10)
    assert rec.returncode == 0, err
    assert "Ctrl-C" in err.decode()
    frames = frames_of(path.read_bytes())  # decodes to the last byte: no partial frame
    assert len(frames) >= 8
    for i, frame in enumerate(frames):
        assert frame.seq == i and frame.data.shape == (1 << 20,)
        assert frame.data[0] == i % 256 and frame.data[-1] == i % 256
    times = Path(str(path) + ".times").read_text().split()
    assert len(times) == len(frames)


def test_record_stops_after_n_or_duration(demo, tmp_path):
    proc = demo
    path = tmp_path / "cam.msgpack"
    out = run("record", "camera", str(path), "-n", "4", url=proc.url)
    assert out.returncode == 0
    frames = frames_of(path.read_bytes())
    assert len(frames) == 4 and all(f.data.shape == (240, 320, 3) for f in frames)
    started = time.monotonic()
    out = run("record", "radar", str(path), "--duration", "1.5", url=proc.url)
    assert out.returncode == 0
    assert time.monotonic() - started >= 1.5
    assert "1.5 s" in out.stderr.decode()
    frames = frames_of(path.read_bytes())
    assert frames and all(isinstance(f, DataFrame) for f in frames)


def test_record_of_a_failed_stream_keeps_the_error_frame(server, tmp_path):
    def broken():
        yield np.zeros(2)
        raise KeyError("gone")

    server.relay.publish("broken", broken(), size=8)
    path = tmp_path / "err.msgpack"
    out = run("record", "broken", str(path), url=server.url)
    assert out.returncode == 1 and "KeyError" in out.stderr.decode()
    frames = frames_of(path.read_bytes())
    assert isinstance(frames[-1], ErrorFrame) and frames[-1].type == "KeyError"
    # played back, the stream fails the same way
    assert run("play", str(path), "again", url=server.url).returncode == 0
    with RelayClient(server.url) as client, pytest.raises(KeyError):
        list(client.stream("again"))


def _recording(tmp_path, server, n, name="rec"):
    server.relay.publish(name, iter(arrays(n)), size=max(n, 1))
    path = tmp_path / f"{name}.msgpack"
    assert run("record", name, str(path), url=server.url).returncode == 0
    return path


def test_play_rate_paces_the_upload(server, tmp_path):
    path = _recording(tmp_path, server, 6)
    started = time.monotonic()
    out = run("play", str(path), "paced", "--rate", "10", url=server.url)
    assert out.returncode == 0
    assert time.monotonic() - started >= 0.5  # 6 items at 10 Hz: 0.5 s at least
    assert server.info("paced")["produced"] == 6


def test_play_realtime_keeps_the_recorded_spacing(server, tmp_path):
    path = tmp_path / "slow.msgpack"
    times = Path(str(path) + ".times")
    body = b"".join(__import__("ndrelay").encode_frame(DataFrame(i, np.zeros(2))) for i in range(3))
    path.write_bytes(body)
    times.write_text("0.0\n0.6\n1.2\n")
    started = time.monotonic()
    out = run("play", str(path), "rt", "--realtime", url=server.url)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started >= 1.2
    times.unlink()
    out = run("play", str(path), "rt2", "--realtime", url=server.url)
    assert out.returncode == 1 and ".times" in one_line(out.stderr)


def test_play_loop_repeats_until_ctrl_c(server, tmp_path):
    path = _recording(tmp_path, server, 3)
    player = subprocess.Popen(
        ndrelay_cmd("play", str(path), "looped", "--loop", "--rate", "50"),
        env=clean_env(NDRELAY_URL=server.url),
        stderr=subprocess.PIPE,
    )
    try:
        poll(
            lambda: "looped" in server.names() and server.info("looped")["produced"] >= 8,
            "eight items played",
            30,
        )
        player.send_signal(signal.SIGINT)
        _, err = player.communicate(timeout=30)
    finally:
        if player.poll() is None:
            player.kill()
            player.wait(10)
    assert "Ctrl-C" in err.decode()
    values: list[int] = []
    with httpx.stream("GET", f"{server.url}/streams/looped?format=ndjson", timeout=20) as body:
        for line in body.iter_lines():
            frame = json.loads(line)
            if frame["kind"] == "data":
                values.append(frame["data"][0])
            if len(values) == 8:
                break
    assert values[:8] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert server.info("looped")["state"] == "open"  # a loop never ends the stream


# -- push ---------------------------------------------------------------------------------


def test_push_npy_npz_and_raw_files(server, tmp_path):
    np.save(tmp_path / "a.npy", np.arange(4, dtype=np.int16))
    np.savez(tmp_path / "b.npz", first=np.ones((2, 2)), second=np.zeros(3, np.uint8))
    (tmp_path / "c.bin").write_bytes(b"\xff" * 10)
    files = [str(tmp_path / n) for n in ("a.npy", "b.npz", "c.bin")]
    out = run("push", "pushed", *files, url=server.url)
    assert out.returncode == 0, out.stderr
    assert "pushed 4 items" in one_line(out.stderr)
    with RelayClient(server.url) as client:
        got = list(client.stream("pushed"))  # ends: push sent the end
    assert len(got) == 4
    np.testing.assert_array_equal(got[0], np.arange(4, dtype=np.int16))
    np.testing.assert_array_equal(got[1], np.ones((2, 2)))
    np.testing.assert_array_equal(got[2], np.zeros(3, np.uint8))
    assert got[3] == b"\xff" * 10


def test_push_keep_open_appends(server, tmp_path):
    np.save(tmp_path / "a.npy", np.arange(3))
    for _ in range(2):
        out = run("push", "appended", str(tmp_path / "a.npy"), "--keep-open", url=server.url)
        assert out.returncode == 0
    info = server.info("appended")
    assert info["produced"] == 2 and info["state"] == "open"


def test_push_refuses_an_object_array_in_one_line(server, tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    out = run("push", "objs", str(tmp_path / "obj.npy"), url=server.url)
    assert out.returncode == 1
    assert "obj.npy" in one_line(out.stderr)


def test_commands_over_a_unix_socket(tmp_path):
    sock = tmp_path / "relay.sock"
    proc = ServeProcess("--demo", uds=str(sock))
    try:
        url = proc.url
        out = run("ls", "--json", url=url)
        assert {"radar", "camera", "count"} <= {s["name"] for s in json.loads(out.stdout)}
        out = run("cat", "count", url=url)
        assert out.returncode == 0
        assert json.loads(out.stdout.splitlines()[-1]) == {"kind": "end", "seq": 10}
    finally:
        proc.stop()
