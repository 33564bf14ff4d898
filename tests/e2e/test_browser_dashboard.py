"""The dashboard in headless Chromium against a real relay: the page loads with a token,
lists the demo streams with rates that change, and its camera preview shows the demo
camera's pixels exactly; other previews (heatmap, plot, bytes) render.

`NDRELAY_UPDATE_SCREENSHOTS=1` writes the screenshot to docs/dashboard.png (the README's
picture); otherwise it goes to the test's temporary directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from _sources import poll

from ndrelay.cli.demo import CAMERA_SHAPE, camera_frame, publish_demo

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DOCS = Path(__file__).resolve().parents[2] / "docs"
TOKEN = "s3cret"


def cells(page, name):
    """The text of the table cells of stream `name`'s row."""
    return page.locator(f'#streams-body tr[data-name="{name}"] td').all_inner_texts()


def test_dashboard_lists_streams_with_live_rates_and_shows_the_camera(
    serve,
    browser,
    tmp_path,
):
    server = serve(token=TOKEN)
    publish_demo(server.relay)
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{server.url}/?token={TOKEN}#camera")

    page.wait_for_selector('#streams-body tr[data-name="count"]', timeout=20_000)
    names = page.locator("#streams-body tr").evaluate_all("rows => rows.map(r => r.dataset.name)")
    assert set(names) == {"radar", "camera", "count"}
    count = cells(page, "count")
    assert count[1:5] == ["queue", "ended", "10/64", "10"]

    # rates appear and the counters move
    first = poll(lambda: (c := cells(page, "camera"))[5] not in ("–", "0.00/s") and c, "a rate", 20)
    assert first[6].endswith("MB/s")
    later = poll(
        lambda: (c := cells(page, "camera"))[4] != first[4] and c,
        "the produced count to change",
        20,
    )
    assert int(later[4]) > int(first[4])

    # the camera preview: read the drawn pixels and the seq they belong to at one moment
    page.wait_for_selector("#preview-canvas[data-seq]", timeout=20_000)
    shot = page.evaluate(
        """() => {
            const c = document.getElementById('preview-canvas');
            const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            return {seq: Number(c.dataset.seq), w: c.width, h: c.height, px: Array.from(px)};
        }"""
    )
    h, w, _ = CAMERA_SHAPE
    assert (shot["h"], shot["w"]) == (h, w)
    rgba = np.array(shot["px"], dtype=np.uint8).reshape(h, w, 4)
    np.testing.assert_array_equal(rgba[..., :3], camera_frame(shot["seq"]))
    assert (rgba[..., 3] == 255).all()
    assert "image" in page.inner_text("#preview-meta")

    # it keeps updating: a later frame replaces it
    poll(
        lambda: (
            page.evaluate("Number(document.getElementById('preview-canvas').dataset.seq)")
            > shot["seq"]
        ),
        "a newer camera frame",
        20,
    )
    out = DOCS if os.environ.get("NDRELAY_UPDATE_SCREENSHOTS") == "1" else tmp_path
    page.screenshot(path=str(out / "dashboard.png"))
    assert (out / "dashboard.png").stat().st_size > 10_000
    assert errors == []


def test_previews_of_numbers_and_bytes(serve, browser):
    server = serve()
    publish_demo(server.relay)
    server.relay.publish("blob", iter([b"\x00\x01\xfe\xff" * 100]), size=4, mode="fanout")
    server.relay.publish("cube", iter([np.arange(24, dtype=">f8").reshape(2, 3, 4)]), size=4)
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector('#streams-body tr[data-name="blob"]', timeout=20_000)

    def show(name):
        page.click(f'#streams-body tr[data-name="{name}"] td.name')
        poll(lambda: page.inner_text("#preview-meta").startswith("seq"), f"{name} preview")
        poll(lambda: page.inner_text("#preview-title") == name, f"{name} selected")
        return poll(lambda: name_meta(page, name), f"{name}'s own preview")

    def name_meta(page, name):
        meta = page.inner_text("#preview-meta")
        expected = {"radar": "<f4 [4,8]", "count": "<i8 [3]", "blob": "bytes", "cube": ">f8"}
        return meta if expected[name] in meta else None

    radar = show("radar")
    assert "range" in radar
    assert page.get_attribute("#preview-canvas", "class") == "heatmap"
    # a fanout stream's events, through the README's snippet
    page.click("#follow")
    poll(lambda: page.locator("#event-log li").count() >= 2, "followed radar events")
    assert page.locator("#event-log li").first.inner_text().endswith("<f4 [4,8]")
    page.click("#follow")
    assert page.inner_text("#follow-state") == "stopped"
    count = show("count")  # a queue stream: no follow button (it would take items)
    assert page.locator("#follow").is_hidden()
    # the newest of ten [i, i*i, i*i*i]: a line plot of [9, 81, 729]
    assert "range 9 … 729" in count
    assert page.get_attribute("#preview-canvas", "class") == "plot"
    blob = show("blob")
    assert "400 B" in blob
    assert page.inner_text("#preview-text").startswith("00 01 fe ff 00 01")
    cube = show("cube")  # big-endian, 3-D: the first 2-D slice, values 0..11
    assert "slice" in cube and "range 0 … 11" in cube
    # the queue stream was only looked at: nothing consumed
    assert server.relay.registry.get("count").info()["depth"] == 10
