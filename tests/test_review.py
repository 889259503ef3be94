"""The review loop of `elcell serve` on real ELPV cells scored by the tiny
trained model: the order cells are offered in (most uncertain first, a share
of random `ok` ones, the reason said), one queue entry per cell however often
it is scored, one row per cell however often it is answered, and a queue that
survives a restart of the station."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from elcell.cells.images import load_cell, read_pixels
from elcell.cells.labels import read_labels_csv
from elcell.errors import DataError
from elcell.infer.review_order import margins, random_turn, review_order
from elcell.infer.runtime import OK, score_cells
from elcell.station.app import Settings, create_app

STATION = "http://127.0.0.1:8000"
LABELS = ["crack", "inactive"]


@pytest.fixture(scope="module")
def cells(seed_cells) -> list[Path]:
    """16 real ELPV cells, half of them defective (conftest's seed_cells)."""
    return seed_cells


@pytest.fixture(scope="module")
def probs(model, cells) -> np.ndarray:
    return score_cells(model, [load_cell(p, model.decoding) for p in cells]).probs


def upload(paths) -> list:
    return [("files", (Path(p).name, Path(p).read_bytes(), "image/png")) for p in paths]


def station(model, folder: Path, probs: np.ndarray, **settings) -> TestClient:
    """A station whose crack threshold sits at the cells' median (the tiny model
    is unsure of them all), review threshold equal to it: no `review` band."""
    middle = float(np.median(probs[:, 0]))
    return TestClient(create_app(model, Settings(labels_out=folder, thresholds=[middle, 1.0],
                                                 review_thresholds=[middle, 1.0], **settings)), base_url=STATION)


# --------------------------------------------------------------------------- the order
def test_the_order_puts_the_most_uncertain_first_and_mixes_in_random_ok_cells(probs):
    thresholds = [float(np.median(probs[:, 0])), 0.5]
    ok = (probs < np.asarray(thresholds)).all(axis=1)
    order = review_order(probs, thresholds, ok, LABELS, random_share=0.25, seed=3)
    assert sorted(c.index for c in order) == list(range(len(probs)))  # every cell once
    distance, nearest = margins(probs, thresholds)
    chosen = [c for c in order if not c.random]
    assert [c.margin for c in chosen] == sorted(c.margin for c in chosen)  # most uncertain first
    assert chosen[0].index == int(np.argmin(distance))
    label = LABELS[int(nearest[chosen[0].index])]
    assert chosen[0].reason.startswith(f"uncertain: {label} ")
    randoms = [k for k, c in enumerate(order) if c.random]
    assert randoms and all(ok[order[k].index] for k in randoms)  # drawn among the ok cells only
    assert randoms[:2] == [3, 7]  # every fourth place while ok cells last
    assert all(order[k].reason == "random check of an ok cell" for k in randoms)
    assert review_order(probs, thresholds, ok, LABELS, 0.25, seed=3) == order  # a seed repeats it
    assert [random_turn(k, 0.1) for k in range(20)].count(True) == 2
    assert not any(c.random for c in review_order(probs, thresholds, ok, LABELS, 0.0))


def test_the_teach_order_puts_likely_defects_and_cells_near_half_in_turn(probs):
    """Recall-first thresholds sit far below 0.5: teach ignores them (a threshold
    of 0.001 gives the same order) and counts from 0.5."""
    ok = np.zeros(len(probs), dtype=bool)
    order = review_order(probs, [0.001, 0.002], ok, LABELS, order="teach")
    assert sorted(c.index for c in order) == list(range(len(probs)))
    assert_teach_order(probs[[c.index for c in order]], [c.reason for c in order])
    assert [c.index for c in review_order(probs, [0.3, 0.9], ok, LABELS, order="teach")] == [c.index for c in order]
    with pytest.raises(ValueError, match="order 'best'"):
        review_order(probs, [0.5, 0.5], ok, LABELS, order="best")


def assert_teach_order(probs: np.ndarray, reasons: list[str]) -> None:
    """The `teach` order: likely defects (labels in turn, highest first) and the
    cells nearest 0.5 alternate, random ok cells aside."""
    taught = [k for k, why in enumerate(reasons) if why != "random check of an ok cell"]
    likely, nearest = taught[0::2], taught[1::2]
    assert all(reasons[k].startswith(f"highest {LABELS[n % 2]} left: ") for n, k in enumerate(likely))
    assert all(reasons[k].endswith(", likely" if probs[k, n % 2] >= 0.5 else ", though unlikely")
               for n, k in enumerate(likely))
    assert likely[0] == int(np.argmax(probs[:, 0]))  # the most likely crack first
    for j in range(2):
        assert np.all(np.diff(probs[likely[j::2], j]) <= 1e-9)  # each label's most likely first
    boundary, _ = margins(probs, [0.5, 0.5])
    assert np.all(np.diff(boundary[nearest]) >= -1e-9) and nearest  # then nearest 0.5 first
    assert all(reasons[k].startswith("nearest 0.5: ") for k in nearest)


def test_segment_writes_its_labels_in_the_order_to_teach(tiny_onnx, model, tmp_path):
    from elcell.cli import main

    photo = Path(__file__).parent / "data" / "modules" / "poly-6x10-A1.jpg"
    assert main(["segment", str(photo), "--grid", "6x10", "--out", str(tmp_path / "cut"), "--model", str(tiny_onnx),
                 "--review-random", "0.1"]) == 0
    lines = (tmp_path / "cut" / "labels.csv").read_text().splitlines()
    assert lines[0] == "path;crack;inactive;reason" and len(lines) == 61
    rows = [line.split(";") for line in lines[1:]]
    probs = score_cells(model, [load_cell(tmp_path / "cut" / row[0], model.decoding) for row in rows]).probs
    randoms = [k for k, row in enumerate(rows) if row[3] == "random check of an ok cell"]
    assert randoms == [9, 19, 29, 39, 49, 59][:len(randoms)] and randoms
    assert all(row[1:3] == ["0", "0"] for row in (rows[k] for k in randoms))
    # the rows' own probabilities in the order they were written: the random rows aside, it is teach's
    taught = [k for k in range(len(rows)) if k not in randoms]
    assert_teach_order(probs[taught], [rows[k][3] for k in taught])
    known = [line for line in lines[1:] if line.split(";")[1:3] != ["", ""]]
    (tmp_path / "cut" / "known.csv").write_text("\n".join([lines[0], *known]) + "\n")
    table = read_labels_csv(tmp_path / "cut" / "known.csv")  # the reason is a note, not a label
    assert table.names == LABELS and len(table) == len(known)


# --------------------------------------------------------------------------- the queue
def test_borderline_cells_reach_the_operator_once_however_often_they_are_scored(model, cells, probs, tmp_path):
    with station(model, tmp_path / "reviewed", probs, review_random=0.0) as client:
        answer = client.post("/api/v1/cells", files=upload(cells)).json()["cells"]
        flagged = [c for c in answer if set(c["decisions"].values()) != {OK}]
        assert flagged and all(c["review"] for c in flagged)
        borderline = [c for c in answer if c not in flagged and c["review"]]
        assert borderline  # ok, but near the threshold: queued although there is no review band
        waiting = client.get("/api/v1/review").json()["waiting"]
        assert waiting == len(flagged) + len(borderline)
        # the same cells again, and one under another name and format: no new entry
        again = client.post("/api/v1/cells", files=upload(cells)).json()["cells"]
        assert [c["review"] for c in again] == [c["review"] for c in answer]
        tiff = io.BytesIO()
        Image.fromarray(read_pixels(cells[0])).save(tiff, format="TIFF")
        renamed = client.post("/api/v1/cells", files=[("files", ("other.tif", tiff.getvalue(), "image/tiff"))])
        assert renamed.json()["cells"][0]["review"] == answer[0]["review"]
        assert client.get("/api/v1/review").json()["waiting"] == waiting
        # handed out most uncertain first, with the reason in words
        item = client.get("/api/v1/review/next", params={"session": "a"}).json()["item"]
        nearest = min((c for c in answer if c["review"]), key=lambda c: abs(
            np.log(c["probs"]["crack"] / (1 - c["probs"]["crack"]))
            - np.log(client.get("/api/v1/model").json()["thresholds"]["crack"]
                     / (1 - client.get("/api/v1/model").json()["thresholds"]["crack"]))))
        assert item["id"] == nearest["review"] and item["reason"].startswith("uncertain: crack")
        assert not item["random"]


def test_the_station_can_hand_out_cells_in_the_order_to_teach(model, cells, probs, tmp_path):
    with station(model, tmp_path / "reviewed", probs, review_random=0.0, review_order="teach") as client:
        answer = client.post("/api/v1/cells", files=upload(cells)).json()["cells"]
        waiting = {c["review"]: c["probs"] for c in answer if c["review"]}
        handed = [client.get("/api/v1/review/next", params={"session": f"s{k}"}).json()["item"] for k in range(4)]
    assert len({item["id"] for item in handed}) == 4
    by = {item["id"]: waiting[item["id"]] for item in handed}
    assert handed[0]["id"] == max(waiting, key=lambda key: waiting[key]["crack"])
    assert handed[0]["reason"].startswith("highest crack left: ")
    rest = set(waiting) - {handed[0]["id"]}
    nearest_half = min(rest, key=lambda key: margins(np.array([list(waiting[key].values())]), [0.5, 0.5])[0][0])
    assert handed[1]["id"] == nearest_half and handed[1]["reason"].startswith("nearest 0.5: ")
    assert handed[2]["reason"].startswith("highest inactive left: ")
    assert by[handed[2]["id"]]["inactive"] == max(waiting[key]["inactive"] for key in rest - {handed[1]["id"]})


@pytest.mark.parametrize("order", ["check", "teach"])
def test_a_full_queue_drops_the_cell_its_order_would_offer_last(cells, order, tmp_path):
    from elcell.station.queue import ReviewQueue, Scored
    from elcell.station.review import LabelsFolder

    queue = ReviewQueue(LabelsFolder(tmp_path / "labels", LABELS), [0.01, 0.01], max_items=3, order=order)
    # crack probabilities of four flagged cells: near the threshold, sure, near 0.5, the likeliest
    probs = [[0.012, 1e-6], [0.08, 1e-6], [0.5, 1e-6], [0.999, 1e-6]]
    offered = [Scored(p.name, read_pixels(p), np.array(q), np.array(["defect", "ok"])) for p, q in
               zip(cells, probs)]
    keys = queue.offer(offered)
    waiting = {key for key in keys if queue.get(key) is not None}
    assert queue.counts()["dropped"] == 1 and len(waiting) == 3
    # check: nearest a threshold first, so the likeliest crack (farthest from 0.01) goes; teach: the
    # likeliest comes first, so the one scored lowest goes
    gone = keys[3] if order == "check" else keys[0]
    assert gone not in waiting


def test_a_share_of_random_ok_cells_is_offered_and_says_so(model, cells, probs, tmp_path):
    with station(model, tmp_path / "reviewed", probs, review_random=1.0, review_seed=0) as client:
        answer = client.post("/api/v1/cells", files=upload(cells)).json()["cells"]
        assert all(c["review"] for c in answer)  # share 1: every ok cell is a candidate
        seen = [client.get("/api/v1/review/next", params={"session": f"s{k}"}).json()["item"] for k in range(4)]
        randoms = [item for item in seen if item["random"]]
        assert randoms and all(item["reason"] == "random check of an ok cell" for item in randoms)
        assert all(set(item["decisions"].values()) == {OK} for item in randoms)


def test_a_page_session_keeps_its_cell_and_returns_it(model, cells, probs, tmp_path):
    with station(model, tmp_path / "reviewed", probs) as client:
        client.post("/api/v1/cells", files=upload(cells))
        first = client.get("/api/v1/review/next", params={"session": "tab1"}).json()["item"]
        reload = client.get("/api/v1/review/next", params={"session": "tab1"}).json()["item"]
        other = client.get("/api/v1/review/next", params={"session": "tab2"}).json()["item"]
        assert reload["id"] == first["id"] != other["id"]  # a reload gets its cell back, others do not
        assert client.post("/api/v1/review/release", params={"session": "tab1"}).status_code == 200
        assert client.get("/api/v1/review/next", params={"session": "tab3"}).json()["item"]["id"] == first["id"]
        assert client.get(first["image"]).status_code == 200
        assert client.get(first["overlays"]["crack"]).headers["content-type"] == "image/png"
        assert client.get("/api/v1/review/next", params={"session": "<x>"}).status_code == 422


# --------------------------------------------------------------------------- answers and restarts
def test_one_row_per_cell_and_a_different_answer_replaces_it(model, cells, probs, tmp_path):
    with station(model, tmp_path / "reviewed", probs) as client:
        client.post("/api/v1/cells", files=upload(cells))
        item = client.get("/api/v1/review/next").json()["item"]
        assert client.post(f"/api/v1/review/{item['id']}", json={"labels": {"bogus": 1}}).status_code == 422
        for loose in (True, "1", 1.0, 2):  # only the numbers 0 and 1 are answers
            refused = client.post(f"/api/v1/review/{item['id']}", json={"labels": {"crack": loose}})
            assert refused.status_code == 422 and "crack" in refused.text, loose
        first = client.post(f"/api/v1/review/{item['id']}", json={"labels": {"crack": 1}}).json()
        same = client.post(f"/api/v1/review/{item['id']}", json={"labels": {"crack": 1}}).json()
        assert same["same"] and same["rows"] == first["rows"] == 1
        other = client.post(f"/api/v1/review/{item['id']}", json={"labels": {"inactive": 1}}).json()
        assert other["replaced"] == {"crack": 1, "inactive": 0} and other["rows"] == 1
        rescored = client.post("/api/v1/cells", files=upload(cells)).json()["cells"]  # after its answer:
        assert next(c for c in rescored if c["name"] == item["name"])["review"] is None  # not queued again
        handed = [client.get("/api/v1/review/next").json()["item"] for _ in range(len(cells) + 1)]
        assert handed[-1] is None and item["id"] not in {h["id"] for h in handed if h}
    table = read_labels_csv(tmp_path / "reviewed" / "labels.csv")
    assert len(table) == 1 and table.targets.tolist() == [[0, 1]]
    original = next(p for p in cells if p.name == item["name"])
    np.testing.assert_array_equal(read_pixels(table.paths[0]), read_pixels(original))


def test_the_queue_and_its_counts_survive_a_restart(model, cells, probs, tmp_path):
    folder = tmp_path / "reviewed"
    with station(model, folder, probs) as client:
        client.post("/api/v1/cells", files=upload(cells))
        before = client.get("/api/v1/review").json()
        held = client.get("/api/v1/review/next", params={"session": "tab"}).json()["item"]
        answered = client.get("/api/v1/review/next").json()["item"]
        client.post(f"/api/v1/review/{answered['id']}", json={"labels": {}})
    with station(model, folder, probs) as client:  # a new station on the same folder
        after = client.get("/api/v1/review").json()
        assert (after["waiting"], after["answered"]) == (before["waiting"] - 1, 1)
        assert client.get(held["image"]).content  # the pixels were on disk, not only in memory
        saved = client.post(f"/api/v1/review/{held['id']}", json={"labels": {"crack": 1}})  # the stale page's answer
        assert saved.status_code == 200 and saved.json()["rows"] == 2
        lost = client.post("/api/v1/review/0123456789abcdef", json={"labels": {}})
        assert lost.status_code == 410 and "no longer waits for review" in lost.json()["detail"]
        skipped = client.post("/api/v1/review/0123456789abcdef/skip")
        assert skipped.status_code == 410 and skipped.json()["detail"].endswith("nothing to skip")
        assert client.get("/api/v1/review").json()["answered"] == 2
        typo = client.post("/api/v1/review/abc.def", json={"labels": {}})
        assert typo.status_code == 404 and "is not a review cell's id" in typo.json()["detail"]
        while (item := client.get("/api/v1/review/next").json()["item"]) is not None:
            client.post(f"/api/v1/review/{item['id']}", json={"labels": {}})
        emptied = client.get("/api/v1/review").json()  # an empty queue still counts its answers
        assert (emptied["waiting"], emptied["answered"]) == (0, after["waiting"] + 1)
    table = read_labels_csv(folder / "labels.csv")
    assert len(table) == after["waiting"] + 1 and all(p.is_file() for p in table.paths)
    assert not (folder / "queue" / f"{held['id']}.png").exists()  # answered cells leave the queue's folder


def test_an_unreadable_queue_file_stops_the_station_and_keeps_its_cells(model, cells, probs, tmp_path):
    folder = tmp_path / "reviewed"
    with station(model, folder, probs) as client:
        client.post("/api/v1/cells", files=upload(cells))
        waiting = client.get("/api/v1/review").json()["waiting"]
    assert waiting > 0
    state = folder / "queue.json"
    state.write_bytes(state.read_bytes()[:300])  # cut short by a failing disk or an editor
    with pytest.raises(DataError, match="the review queue cannot be read .* nothing was changed"):
        station(model, folder, probs)
    assert len(list((folder / "queue").glob("*.png"))) == waiting
    state.write_text('{"labels": ["crack", "inactive"], "dropped": null, "items": []}')  # edited by hand
    with station(model, folder, probs) as client:  # readable: starts (the images it does not list go)
        assert client.get("/api/v1/review").json()["waiting"] == 0


def test_a_restart_with_another_model_scores_the_waiting_cells_again(model, cells, probs, tmp_path):
    folder = tmp_path / "reviewed"
    with station(model, folder, probs) as client:
        client.post("/api/v1/cells", files=upload(cells))
        waiting = client.get("/api/v1/review").json()["waiting"]
        assert waiting > 0 and client.app.state.station.rescored is None  # a new folder
    with station(model, folder, probs) as client:  # the same model and thresholds: nothing to redo
        assert client.app.state.station.rescored is None
    low = float(probs[:, 0].min()) / 2  # every cell a crack to this "model": all stay, now flagged
    settings = Settings(labels_out=folder, thresholds=[low, 1.0], review_thresholds=[low, 1.0])
    with TestClient(create_app(model, settings), base_url=STATION) as client:
        note = client.app.state.station.rescored
        assert note and f"{waiting} cells waiting" in note and f"{waiting} still wait" in note
        handed = [client.get("/api/v1/review/next", params={"session": f"s{i}"}).json()["item"]
                  for i in range(waiting)]
        assert all(item["decisions"]["crack"] == "defect" for item in handed)
    high = float(probs[:, 0].max()) * 1e-3 + 0.999  # nothing near this threshold: nothing left to review
    settings = Settings(labels_out=folder, thresholds=[high, 1.0], review_thresholds=[high, 1.0])
    with TestClient(create_app(model, settings), base_url=STATION) as client:
        assert "left the queue" in client.app.state.station.rescored
        assert client.get("/api/v1/review").json()["waiting"] == 0
    assert not list((folder / "queue").glob("*.png"))  # their images went with them


def test_a_cell_the_new_model_cannot_read_leaves_without_stopping_the_start(cells, probs, tmp_path):
    from elcell.station.queue import ReviewQueue, Scored
    from elcell.station.review import LabelsFolder

    folder = LabelsFolder(tmp_path / "labels", LABELS)
    queue = ReviewQueue(folder, [0.0, 0.0])  # every cell flagged: all queued
    pixels = [read_pixels(p) for p in cells[:4]]
    keys = queue.offer([Scored(p.name, px, pr, np.array(["defect", "ok"]))
                        for p, px, pr in zip(cells[:4], pixels, probs[:4], strict=True)])
    bad = keys[1]

    def score(batch):  # a model that cannot read one of them (say, another bit depth)
        if any(np.array_equal(b, pixels[1]) for b in batch):
            raise ValueError("cannot read this cell")
        return np.full((len(batch), 2), 0.9), np.full((len(batch), 2), "defect")

    note = queue.rescore({"model": "new"}, score)
    assert "4 cells waiting for review had no record" in note and "1 it cannot read left the queue" in note
    assert queue.get(bad) is None and len(queue) == 3 and not (tmp_path / "labels" / "queue" / f"{bad}.png").exists()
    assert all(queue.get(k).probs["crack"] == 0.9 for k in keys if k != bad)
    again = ReviewQueue(folder, [0.0, 0.0])  # what was saved: the new scores and scorer
    assert len(again) == 3 and again.rescore({"model": "new"}, score) is None


def test_reviewers_answering_one_cell_at_once_leave_one_row_and_its_image(cells, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from elcell.station.review import LabelsFolder

    folder = LabelsFolder(tmp_path / "labels", LABELS)
    pixels = read_pixels(cells[0])
    with ThreadPoolExecutor(8) as pool:
        saved = list(pool.map(lambda i: folder.add(pixels, "same.png", {"crack": i % 2}), range(16)))
    table = read_labels_csv(folder.csv)
    assert len(table) == 1 and {s.path for s in saved} == {folder.answered[saved[0].path[-20:-4]][0]}
    np.testing.assert_array_equal(read_pixels(table.paths[0]), pixels)
    assert sorted(p.name for p in folder.cells.iterdir()) == [table.paths[0].name]  # no stray image
