"""The demo's events through Gradio's queue (``POST /gradio_api/queue/join``), as the page fires them.

The page's own events (previews, picks, the searches chained after a pick) are private by name, but the
browser fires every one of them through the queue, so the queue cannot refuse them (SECURITY.md, "Demo
server"). What is checked here: the page's events still run there, and no event takes a file the client
did not upload, on the queue or on the named public routes.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest

from tests.demo.conftest import REPO

PHOTO = REPO / "tests" / "fixtures" / "photos" / "chelsea.jpg"  # a real image outside every served folder


class Page:
    """One browser session's worth of requests: the same session hash for every event, as the page."""

    def __init__(self, url: str) -> None:
        self.base = url.rstrip("/")
        self.session = uuid.uuid4().hex[:12]
        config = httpx.get(self.base + "/config", timeout=10).json()
        self.fn = {dep["api_name"]: dep["id"] for dep in config["dependencies"]}
        self.props = {c["props"].get("elem_id"): c["props"] for c in config["components"] if "props" in c}

    def upload(self, path: Path) -> dict:
        with path.open("rb") as handle:
            response = httpx.post(self.base + "/gradio_api/upload", files={"files": handle}, timeout=30)
        response.raise_for_status()
        return {"path": response.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}

    def fire(self, api_name: str, data: list, event_data: dict | None = None) -> dict:
        """Join the queue with the event's fn_index and read the stream until it completes."""
        body = {"data": data, "fn_index": self.fn[api_name], "session_hash": self.session}
        body["event_data"] = event_data
        response = httpx.post(self.base + "/gradio_api/queue/join", json=body, timeout=10)
        assert response.status_code == 200, response.text
        event_id = response.json()["event_id"]
        stream = self.base + "/gradio_api/queue/data"
        with httpx.stream("GET", stream, params={"session_hash": self.session}, timeout=60) as messages:
            for line in messages.iter_lines():
                message = json.loads(line[5:]) if line.startswith("data:") else {}
                if message.get("msg") == "process_completed" and message.get("event_id") == event_id:
                    return message
        raise AssertionError(f"{api_name}: the stream ended before the event completed")


def file_names(output: list) -> list[str]:
    """Names of the files in an event's output (gallery items or file values)."""
    names = []
    for value in output:
        items = value if isinstance(value, list) else [value]
        for item in items:
            file = item.get("image", item) if isinstance(item, dict) else None
            if isinstance(file, dict) and "path" in file:
                names.append(Path(file["path"]).name)
    return names


@pytest.fixture
def page(demo_server) -> Page:
    return Page(demo_server.url)


def test_the_pages_own_events_run_through_the_queue(page):
    model, gallery = page.props["model-choice"]["value"], page.props["gallery-choice"]["value"]
    assert "Gallery" in page.fire("status", [model, gallery])["output"]["data"][0]

    query = page.upload(PHOTO)
    preview = page.fire("preview", [query])
    assert preview["success"] and file_names(preview["output"]["data"])  # the decoded query, as an image

    found = page.fire("search", [model, gallery, query, 3, None])  # None: the State, kept on the server
    assert found["success"], found
    hits = found["output"]["data"][1]
    assert len(hits) == 3 and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]

    # clicking the second result makes it the query (the hit paths come from this session's State)...
    picked = page.fire("pick", [None], event_data={"index": 1, "value": None})
    assert picked["success"] and file_names(picked["output"]["data"]) == [Path(hits[1]["file"]).name]
    # ...and the chained search from it finds it first, at cosine 1
    again = page.fire("search_2", [model, gallery, picked["output"]["data"][0], 3, None])
    assert again["success"] and again["output"]["data"][1][0]["file"] == hits[1]["file"]
    assert again["output"]["data"][1][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_a_click_index_the_page_never_sends_is_refused_with_a_message(page):
    model, gallery = page.props["model-choice"]["value"], page.props["gallery-choice"]["value"]
    found = page.fire("search", [model, gallery, page.upload(PHOTO), 2, None])
    assert found["success"]
    for index in (2, -1, "0", None, [0]):  # 2 results were shown: valid indices are 0 and 1
        refused = page.fire("pick", [None], event_data={"index": index, "value": None})
        assert refused["success"] is False and "no result number" in str(refused["output"]), refused
    refused = page.fire("pick_example", [gallery], event_data={"index": 10_000, "value": None})
    assert refused["success"] is False and "no example number" in str(refused["output"]), refused
    # the session is unharmed: a valid click still picks the second result
    picked = page.fire("pick", [None], event_data={"index": 1, "value": None})
    assert picked["success"] and file_names(picked["output"]["data"]) == [
        Path(found["output"]["data"][1][1]["file"]).name
    ]


def test_a_file_the_client_did_not_upload_is_refused(page):
    model, gallery = page.props["model-choice"]["value"], page.props["gallery-choice"]["value"]
    forged = {"path": str(PHOTO), "orig_name": "chelsea.jpg", "meta": {"_type": "gradio.FileData"}}
    # the private preview would send the decoded image back; the searches and extraction would use it
    for api_name, data in (
        ("preview", [forged]),
        ("search", [model, gallery, forged, 3, None]),
        ("extract", [model, forged, "model default", True]),
    ):
        refused = page.fire(api_name, data)
        assert refused["success"] is False and "data" not in refused["output"], (api_name, refused)
    # the same image, uploaded, is accepted: the refusal is about where the path points, not the image
    assert page.fire("preview", [page.upload(PHOTO)])["success"]


def test_a_forged_path_is_refused_on_the_public_named_route(demo_server):
    call = demo_server.url.rstrip("/") + "/gradio_api/call/extract"
    page = Page(demo_server.url)
    forged = {"path": str(PHOTO), "orig_name": "chelsea.jpg", "meta": {"_type": "gradio.FileData"}}
    model = page.props["model-choice"]["value"]
    response = httpx.post(call, json={"data": [model, forged, "model default", True]}, timeout=10)
    assert response.status_code == 200
    with httpx.stream("GET", f"{call}/{response.json()['event_id']}", timeout=30) as stream:
        body = "".join(stream.iter_text())
    assert "event: error" in body and "event: complete" not in body


def test_a_queue_join_for_an_event_the_page_lacks_is_a_4xx_and_the_page_keeps_working(page):
    join = page.base + "/gradio_api/queue/join"
    known = sorted(page.fn.values())
    for fn_index in (max(known) + 1, -1, "0", None, 1.5, True):
        body = {"data": [], "fn_index": fn_index, "session_hash": page.session}
        response = httpx.post(join, json=body, timeout=10)
        assert response.status_code == 422, (fn_index, response.text)
        assert "unknown event" in response.json()["error"]["message"]
    huge = httpx.post(join, content=b"{" + b" " * (2 << 20) + b"}", timeout=30,
                      headers={"content-type": "application/json"})  # fmt: skip
    assert huge.status_code == 413
    model, gallery = page.props["model-choice"]["value"], page.props["gallery-choice"]["value"]
    assert "Gallery" in page.fire("status", [model, gallery])["output"]["data"][0]


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/big.jpg", "https://example.com/x.jpg", " HTTPS://h/x"])
def test_a_url_as_file_input_is_refused_before_gradio_fetches_it(page, url):
    """Gradio downloads a file input given as a URL into its cache, with no size limit (``--max-file-size``
    covers uploads only) and for any visitor; the guard refuses it on the queue and the named routes."""
    model, gallery = page.props["model-choice"]["value"], page.props["gallery-choice"]["value"]
    remote = {"path": url, "orig_name": "x.jpg", "meta": {"_type": "gradio.FileData"}}
    join = {"data": [model, gallery, remote, 3, None], "fn_index": page.fn["search"]}
    calls = [
        (page.base + "/gradio_api/queue/join", {**join, "session_hash": page.session}),
        (page.base + "/gradio_api/call/search", {"data": [model, gallery, [remote], 3]}),
        (page.base + "/gradio_api/call/extract", {"data": [model, {"in": remote}, "model default", True]}),
    ]
    for target, body in calls:
        response = httpx.post(target, json=body, timeout=10)
        assert response.status_code == 422, (target, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"  # the API's error object, as from /v1 routes
        assert "does not fetch URLs" in error["message"] and "/gradio_api/upload" in error["message"]
    # an uploaded file still goes through the same routes
    assert page.fire("search", [model, gallery, page.upload(PHOTO), 3, None])["success"]
