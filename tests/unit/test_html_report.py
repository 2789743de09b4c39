"""report.html of `vltune eval grounding` from hand-made answers (no model): tables, gallery, filters' data
attributes, escaping, and nothing fetched from the network."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

from tests.helpers import grounding_report, write_image, write_jsonl
from vltune.data.formats import read_dataset
from vltune.eval.html_report import KEPT_GLOBAL, PALETTE, setup_colours, thumbnail, write_html_report

HIT, MISS = "click(200, 400)", "click(900, 900)"  # rel1000 on 200x100: (40, 40) is inside the box, (180, 90) not
INSTRUCTION = "Click <b>Save & close</b>"


class Page(HTMLParser):
    """The parts of report.html the tests look at."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[tuple[dict, list[str]]]] = {}
        self.cards: list[dict] = []
        self.selects: dict[str, list[str]] = {}
        self.refs: list[str] = []  # every src / href
        self.instructions: list[str] = []
        self._table = self._row = self._cell = self._select = None
        self._instruction = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = (a, [])
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "div" and "card" in a.get("class", "").split():
            self.cards.append({**a, "imgs": []})
        elif tag == "img" and self.cards:
            self.cards[-1]["imgs"].append(a.get("src"))
        elif tag == "select":
            self._select = self.selects.setdefault(a["id"], [])
        elif tag == "option" and self._select is not None:
            self._select.append(a.get("value"))
        elif tag == "p" and a.get("class") == "instruction":
            self._instruction = True
            self.instructions.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row[1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "select":
            self._select = None
        elif tag == "p":
            self._instruction = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._instruction:
            self.instructions[-1] += data

    def body_rows(self, table: str) -> list[tuple[dict, list[str]]]:
        return self.tables[table][1:]

    def header(self, table: str) -> list[str]:
        return self.tables[table][0][1]


def _samples(tmp_path, kinds=True):
    """Users 1 (3 samples), 2 (2) and 3 (1); the box of every target is [20, 20, 60, 60] on a 200x100 image."""
    rows = []
    for i, (user, kind) in enumerate([(1, "explicit"), (1, "habit"), (1, "habit"), (2, "explicit"), (2, "habit"),
                                      (3, "explicit")]):
        img = write_image(tmp_path / "img" / f"s{i}.png", color=(40 * i % 255, 120, 200), size=(200, 100))
        row = {"messages": [{"role": "user", "content": "<image>" + (INSTRUCTION if i == 0 else f"Click item {i}")},
                            {"role": "assistant", "content": HIT}],
               "images": [img], "user": user,
               "target": {"box": [20, 20, 60, 60], "point": [40, 40], "size": [200, 100]}}
        if kinds:
            row["kind"] = kind
        rows.append(row)
    samples, errors = read_dataset(write_jsonl(tmp_path / "test.jsonl", rows))
    assert not errors and len(samples) == 6
    return samples


ANSWERS = {  # per setup, per sample (users 1 1 1 2 2 3)
    "zero-shot": ["no idea"] * 6,
    "baseline": [HIT, MISS, MISS, MISS, MISS, MISS],
    "global": [HIT, MISS, MISS, HIT, MISS, MISS],
    "personalised": [HIT, HIT, MISS, HIT, HIT, MISS],
}


def _page(tmp_path, samples, answers=ANSWERS, per_user=12, **extra):
    report, predictions = grounding_report(samples, answers, **extra)
    (tmp_path / "out").mkdir()
    path = write_html_report(tmp_path / "out", report, predictions, samples, per_user=per_user)
    assert path == tmp_path / "out" / "report.html"
    return path.read_text(encoding="utf-8"), Page(path.read_text(encoding="utf-8"))


def test_tables_gallery_filters_and_escaping(tmp_path):
    samples = _samples(tmp_path)
    text, page = _page(tmp_path, samples, kept_global=[2])

    overall = {cells[0]: cells for _, cells in page.body_rows("overall")}
    assert list(overall) == ["zero-shot", "baseline", "global", "personalised"]  # whatever setups there are
    assert page.header("overall")[:4] == ["setup", "click accuracy", "explicit", "habit"]
    assert overall["global"][1:4] == ["33.3%", "66.7%", "0.0%"]  # 2/6; explicit 2/3; habit 0/3
    assert overall["personalised"][1:4] == ["66.7%", "66.7%", "66.7%"]
    assert overall["zero-shot"][1] == "0.0%" and overall["zero-shot"][5] == "100.0%"  # all unparseable

    head = page.header("per-user")
    assert head == ["user", "n", "zero-shot", "baseline", "global", "personalised",
                    "gain of personalised over global", "note"]
    rows = page.body_rows("per-user")
    assert [(a["data-user"], cells[:7]) for a, cells in rows] == [
        ("1", ["1", "3", "0.0%", "33.3%", "33.3%", "66.7%", "+33.3 pp"]),
        ("2", ["2", "2", "0.0%", "0.0%", "50.0%", "100.0%", "+50.0 pp"]),
        ("3", ["3", "1", "0.0%", "0.0%", "0.0%", "0.0%", "+0.0 pp"])]
    assert [cells[7] for _, cells in rows] == ["", KEPT_GLOBAL, ""]  # kept_global as ints, the keys are strings
    assert [a.get("class") for a, _ in rows] == [None, "kept", None]
    # the spread of per-user gains (report["gains"]): personalised +33.3/+50/0, baseline 0/-50/0
    assert ("personalised: per-user gain over global min +0.0, median +33.3, max +50.0 points; 0 of 3 user(s) "
            "worse than global") in text
    assert "baseline: per-user gain over global min -50.0, median +0.0, max +0.0 points; 1 of 3 user(s)" in text

    assert [c["data-user"] for c in page.cards] == ["1", "1", "1", "2", "2", "3"]
    assert [c["data-kind"] for c in page.cards] == ["explicit", "habit", "habit", "explicit", "habit", "explicit"]
    assert page.selects == {"user-filter": ["", "1", "2", "3"], "kind-filter": ["", "explicit", "habit"]}
    assert all(len(c["imgs"]) == 1 and c["imgs"][0].startswith("data:image/jpeg;base64,") for c in page.cards)
    assert page.refs and all(r.startswith("data:") for r in page.refs)
    assert "http://" not in text and "https://" not in text
    assert page.instructions[0] == INSTRUCTION  # shown as text...
    assert "Click &lt;b&gt;Save &amp; close&lt;/b&gt;" in text and "<b>Save" not in text  # ...never as markup
    # one marker colour per drawn setup (all but zero-shot), each named in the legend
    assert setup_colours(list(ANSWERS)) == {"baseline": PALETTE[0], "global": PALETTE[1], "personalised": PALETTE[2]}
    assert "zero-shot: not drawn" in text and "personalised click" in text


def test_cap_no_kinds_no_kept_global_no_gain(tmp_path):
    samples = _samples(tmp_path, kinds=False)
    answers = {"global": ANSWERS["global"], "personalised": ANSWERS["personalised"], "model": ANSWERS["global"]}
    text, page = _page(tmp_path, samples, answers, per_user=2)
    assert [c["data-user"] for c in page.cards] == ["1", "1", "2", "2", "3"]  # at most 2 per user
    assert "(2 of 3 screenshots)" in text
    assert "kind-filter" not in page.selects and all(c["data-kind"] == "" for c in page.cards)
    assert page.header("overall") == ["setup", "click accuracy", "mean distance (px)", "unparseable", "n"]
    # the last setup is `model`: its gain over global is in the column; no kept_global key: no note column
    assert page.header("per-user")[-1] == "gain of model over global"
    assert [cells[-1] for _, cells in page.body_rows("per-user")] == ["+0.0 pp"] * 3


def test_without_global_there_is_no_gain_column(tmp_path):
    samples = _samples(tmp_path)
    _, page = _page(tmp_path, samples, {"model": ANSWERS["global"]}, per_user=0)
    assert page.header("per-user") == ["user", "n", "model"]
    assert not page.cards  # --html_per_user 0: tables only


def test_thumbnail_draws_the_box_and_the_clicks():
    from PIL import Image

    img = Image.new("RGB", (800, 600), (255, 255, 255))
    uri, size = thumbnail(img, [100, 100, 300, 300], [((600, 400), (0, 90, 220))], max_size=(400, 300))
    thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert thumb.size == size == (400, 300)

    def near(px, rgb):
        return all(abs(a - b) < 60 for a, b in zip(px, rgb))

    assert near(thumb.getpixel((100, 50)), (0, 170, 0))  # top edge of the box, at half scale
    assert near(thumb.getpixel((300, 200)), (0, 90, 220))  # the click's centre
    assert near(thumb.getpixel((200, 250)), (255, 255, 255))


def test_an_unreadable_screenshot_costs_its_picture_only(tmp_path):
    samples = _samples(tmp_path)
    samples[1].images[0] = str(tmp_path / "missing.png")
    text, page = _page(tmp_path, samples)
    assert len(page.cards) == 6 and not page.cards[1]["imgs"] and "screenshot unreadable" in text
