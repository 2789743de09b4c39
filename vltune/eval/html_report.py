"""report.html for `vltune eval grounding`: one self-contained page (inline CSS and JS, screenshots as base64
data URIs, nothing fetched from anywhere) with the overall table of every setup (per-kind columns), the
per-user table (each setup's accuracy, the last setup's gain over `global`, users whose global model was
kept), and per user a gallery of screenshots with the true box and each setup's click drawn on them.
A user filter and a kind filter (when the data has kinds) hide non-matching table rows and cards."""

from __future__ import annotations

import base64
import io
import logging
from html import escape
from pathlib import Path

logger = logging.getLogger("vltune")

TRUTH_COLOUR = (0, 170, 0)
# One colour per drawn setup, in setup order (green is the true box's); beyond the palette it wraps around.
PALETTE = ((230, 25, 75), (0, 90, 220), (245, 130, 48), (145, 30, 180), (0, 170, 190), (240, 50, 230),
           (128, 128, 0), (90, 60, 20))
SHAPES = (("x", "\u2715"), ("+", "+"), ("o", "\u25cb"), ("s", "\u25a1"))  # marker, its glyph in the legend
UNDRAWN = ("zero-shot",)  # its clicks are mostly unparseable or far off: its hits are listed, not drawn
KEPT_GLOBAL = "global kept (adapter worse on the user's validation slice)"


def pct(v) -> str:
    """A rate as a percentage cell ('-' when there is none); report.md uses it too."""
    return "-" if v is None else f"{100 * v:.1f}%"


def px(v) -> str:
    """A distance in pixels as a cell ('-' when there is none)."""
    return "-" if v is None else f"{v:.1f}"


def _hex(rgb) -> str:
    return "#%02x%02x%02x" % tuple(rgb)


def _attr(v) -> str:
    return escape("" if v is None else str(v), quote=True)


def setup_colours(names: list[str]) -> dict[str, tuple]:
    """The marker colour of each setup that is drawn (every one but zero-shot), from the fixed palette."""
    drawn = [n for n in names if n not in UNDRAWN]
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(drawn)}


def setup_shapes(names: list[str]) -> dict[str, tuple[str, str]]:
    """(marker, legend glyph) of each drawn setup: shapes differ too, so clicks on one spot stay apart."""
    drawn = [n for n in names if n not in UNDRAWN]
    return {n: SHAPES[i % len(SHAPES)] for i, n in enumerate(drawn)}


def _marker(draw, x: float, y: float, colour, shape: str, r: int = 6) -> None:
    """One click marker, with a white rim that keeps it visible on any screen."""
    for width, fill in ((5, (255, 255, 255)), (3, colour)):
        if shape == "+":
            draw.line([x - r, y, x + r, y], fill=fill, width=width)
            draw.line([x, y - r, x, y + r], fill=fill, width=width)
        elif shape == "o":
            draw.ellipse([x - r, y - r, x + r, y + r], outline=fill, width=width - 1)
        elif shape == "s":
            draw.rectangle([x - r, y - r, x + r, y + r], outline=fill, width=width - 1)
        else:
            draw.line([x - r, y - r, x + r, y + r], fill=fill, width=width)
            draw.line([x - r, y + r, x + r, y - r], fill=fill, width=width)


def thumbnail(image, box, clicks: list[tuple],
              max_size: tuple[int, int] = (360, 270)) -> tuple[str, tuple[int, int]]:
    """A downscaled copy of `image` with the true box (green outline) and one marker per (point, colour[,
    shape]) drawn on it (shape: x, +, o or s) (coordinates in pixels of the original image), as a JPEG data URI."""
    from PIL import ImageDraw

    w, h = image.size
    thumb = image.convert("RGB")
    thumb.thumbnail(max_size)
    sx, sy = thumb.width / max(w, 1), thumb.height / max(h, 1)
    draw = ImageDraw.Draw(thumb)
    if box:
        x1, y1, x2, y2 = box
        draw.rectangle([x1 * sx, y1 * sy, x2 * sx, y2 * sy], outline=TRUTH_COLOUR, width=2)
    for (px, py), colour, *shape in clicks:
        _marker(draw, px * sx, py * sy, colour, shape[0] if shape else "x")
    buf = io.BytesIO()
    thumb.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), thumb.size


def _overall_table(report: dict, names: list[str], kinds: list[str]) -> str:
    head = ("<tr><th>setup</th><th>click accuracy</th>" + "".join(f"<th>{escape(k)}</th>" for k in kinds)
            + "<th>mean distance (px)</th><th>unparseable</th><th>n</th></tr>")
    rows = []
    for n in names:
        s = report["setups"][n]
        o = s["overall"]
        per_kind = s.get("per_kind", {})
        rows.append(f"<tr data-setup=\"{_attr(n)}\"><td>{escape(n)}</td><td>{pct(o.get('click_accuracy'))}</td>"
                    + "".join(f"<td>{pct(per_kind.get(k, {}).get('click_accuracy'))}</td>" for k in kinds)
                    + f"<td>{px(o.get('mean_distance_px'))}</td><td>{pct(o.get('unparseable_rate'))}</td>"
                    f"<td>{o.get('n', '-')}</td></tr>")
    return f"<table id=\"overall\">\n<thead>{head}</thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table>"


def _per_user_table(report: dict, names: list[str], users: list[str]) -> str:
    last = names[-1] if names else None
    gain = last is not None and last != "global" and "global" in names
    kept = report.get("kept_global")
    kept = None if kept is None else {str(u) for u in kept}
    head = ("<tr><th>user</th><th>n</th>" + "".join(f"<th>{escape(n)}</th>" for n in names)
            + (f"<th>gain of {escape(last)} over global</th>" if gain else "")
            + ("<th>note</th>" if kept is not None else "") + "</tr>")
    rows = []
    for u in users:
        per = {n: report["setups"][n].get("per_user", {}).get(u) for n in names}
        count = next((p["n"] for p in per.values() if p), "-")
        accs = {n: (p or {}).get("click_accuracy") for n, p in per.items()}
        cells = "".join(f"<td>{pct(accs[n])}</td>" for n in names)
        if gain:
            g = (report.get("gains", {}).get(last) or {}).get("per_user", {}).get(u)  # eval grounding's user_gains
            cells += "<td class=\"gain\">" + ("-" if g is None else f"{g:+.1f} pp") + "</td>"
        marked = kept is not None and u in kept
        if kept is not None:
            cells += f"<td>{escape(KEPT_GLOBAL) if marked else ''}</td>"
        kept_class = ' class="kept"' if marked else ""
        rows.append(f"<tr data-user=\"{_attr(u)}\"{kept_class}>"
                    f"<td>{escape(u)}</td><td>{count}</td>{cells}</tr>")
    return f"<table id=\"per-user\">\n<thead>{head}</thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table>"


def _gains(report: dict) -> str:
    """The spread of each setup's per-user gain over global (report["gains"], written by eval grounding)."""
    lines = [f"<li>{escape(name)}: per-user gain over global min {g['min']:+.1f}, median {g['median']:+.1f}, "
             f"max {g['max']:+.1f} points; {g['worse']} of {g['n_users']} user(s) worse than global</li>"
             for name, g in (report.get("gains") or {}).items() if g.get("n_users")]
    return f"<ul id=\"gains\">{''.join(lines)}</ul>" if lines else ""


def _outcome(record: dict) -> str:
    return "hit" if record.get("ok") else "unparseable" if record.get("pred") is None else "miss"


def _card(i: int, sample, records: dict[str, dict], names: list[str], colours: dict[str, tuple],
          max_size: tuple[int, int]) -> str:
    from ..data.images import load_image

    first = records[names[0]]
    target = first.get("target") or {}
    shapes = setup_shapes(names)
    clicks = [(records[n]["pred"], colours[n], shapes[n][0]) for n in names
              if n in colours and records[n].get("pred")]
    try:
        uri, (w, h) = thumbnail(load_image(sample.images[0]), target.get("box"), clicks, max_size)
        img = f"<img src=\"{uri}\" width=\"{w}\" height=\"{h}\" alt=\"screenshot {i}\">"
        width = max(w, 200)
    except Exception as e:  # one unreadable screenshot costs its picture, not the report
        logger.warning("[eval] report.html: no thumbnail for %s: %s", first.get("where"), e)
        img = f"<div class=\"noimg\">screenshot unreadable: {escape(str(e))}</div>"
        width = max_size[0]
    hits = " ".join(
        f"<span class=\"{'hit' if records[n].get('ok') else 'miss'}\" data-setup=\"{_attr(n)}\">"
        + (f"<b class=\"glyph\" style=\"color:{_hex(colours[n])}\">{shapes[n][1]}</b>" if n in colours else "")
        + f"{escape(n)} {_outcome(records[n])}</span>" for n in names)
    kind = first.get("kind")
    return (f"<div class=\"card\" data-user=\"{_attr(first.get('user'))}\" data-kind=\"{_attr(kind)}\" "
            f"style=\"width:{width}px\">{img}"
            f"<p class=\"instruction\">{escape(sample.instruction())}</p>"
            + (f"<p class=\"kind\">kind: {escape(str(kind))}</p>" if kind is not None else "")
            + f"<p class=\"hits\">{hits}</p></div>")


def _options(select_id: str, label: str, values: list[str]) -> str:
    opts = "".join(f"<option value=\"{_attr(v)}\">{escape(v)}</option>" for v in values)
    return (f"<label>{escape(label)} <select id=\"{select_id}\"><option value=\"\">all</option>{opts}"
            "</select></label>")


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1em 1.5em;color:#222}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;margin:.8em 0 .3em}h3{font-size:1em}
.meta,.note{color:#555;margin:.3em 0}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
thead th{background:#f0f0f0}
tr.kept td{background:#fff6d5}
.filters{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ddd;z-index:1}
.filters label{margin-right:1.5em}
.legend span{margin-right:1.2em}
.box{display:inline-block;width:.9em;height:.7em;border:2px solid #00aa00;margin-right:.3em;vertical-align:middle}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
.glyph{margin-right:.3em}
.card{border:1px solid #ddd;border-radius:4px;padding:6px;background:#fafafa}
.card img{display:block;max-width:100%}
.card p{margin:.3em 0}
.instruction{font-weight:600}
.kind{color:#666}
.hits span{margin-right:.8em;white-space:nowrap}
.hit{color:#07780a}.miss{color:#b00020}
.noimg{height:120px;background:#eee;color:#900;padding:8px}
"""

JS = """
(function(){
  var us=document.getElementById('user-filter'), ks=document.getElementById('kind-filter');
  function apply(){
    var u=us?us.value:'', k=ks?ks.value:'', shown=0;
    document.querySelectorAll('#per-user tbody tr').forEach(function(r){
      r.style.display=(!u||r.dataset.user===u)?'':'none';
    });
    document.querySelectorAll('section.user').forEach(function(s){
      var cards=s.querySelectorAll('.card'), here=0;
      cards.forEach(function(c){
        var on=(!u||c.dataset.user===u)&&(!k||c.dataset.kind===k);
        c.style.display=on?'':'none'; if(on) here++;
      });
      shown+=here;
      s.style.display=((!u||s.dataset.user===u)&&(here||!cards.length))?'':'none';
    });
    document.getElementById('shown').textContent=shown;
  }
  if(us) us.addEventListener('change',apply);
  if(ks) ks.addEventListener('change',apply);
  apply();
})();
"""


def write_html_report(out: Path, report: dict, predictions: dict[str, list[dict]], samples,
                      per_user: int | None = 12, max_size: tuple[int, int] = (360, 270)) -> Path:
    """Write out/report.html; return its path. predictions[name][i] is the record of samples[i] under each
    setup (score_samples' records); per_user caps the screenshots shown per user (None or < 0: all, 0: none)."""
    out = Path(out)
    names = list(report["setups"])
    drawn = setup_colours(names)
    kinds = sorted({str(k) for s in report["setups"].values() for k in s.get("per_kind", {})}
                   | {str(r["kind"]) for rs in predictions.values() for r in rs if r.get("kind") is not None})
    users: list[str] = []
    for s in report["setups"].values():
        users += [u for u in s.get("per_user", {}) if u not in users]
    by_user: dict[str, list[int]] = {}
    present = [n for n in names if n in predictions]  # setups with per-sample records (normally all)
    ref = predictions[present[0]] if present else []
    for i, r in enumerate(ref):
        by_user.setdefault(str(r.get("user")), []).append(i)
    users += [u for u in by_user if u not in users]

    meta = [f"model: <code>{escape(str(report.get('model', '-')))}</code>"]
    if report.get("dataset"):
        data = report["dataset"] if isinstance(report["dataset"], list) else [report["dataset"]]
        meta.append("data: " + escape(", ".join(map(str, data)))
                    + f" ({report.get('n_samples', len(ref))} samples"
                    + (f", users {escape(str(report['users']))}" if report.get("users") else "") + ")")
    if report.get("coordinates"):
        meta.append(f"coordinates: {escape(str(report['coordinates']))}")

    legend = ["<span><i class=\"box\"></i>true target box</span>"]
    shapes = setup_shapes(names)
    legend += [f"<span><b class=\"glyph\" style=\"color:{_hex(c)}\">{shapes[n][1]}</b>{escape(n)} click</span>"
               for n, c in drawn.items()]
    legend += [f"<span>{escape(n)}: not drawn (its hit is listed under each screenshot)</span>"
               for n in names if n not in drawn]

    sections = []
    for u in users if per_user != 0 else []:
        idx = by_user.get(u, [])
        shown = idx if per_user is None or per_user < 0 else idx[:per_user]
        cards = [_card(i, samples[i], {n: predictions[n][i] for n in present}, present, drawn, max_size)
                 for i in shown]
        sections.append(f"<section class=\"user\" data-user=\"{_attr(u)}\"><h3>user {escape(u)} "
                        f"<small>({len(shown)} of {len(idx)} screenshots)</small></h3>"
                        f"<div class=\"gallery\">{''.join(cards)}</div></section>")

    kind_note = " Per-user figures are over all instruction kinds; the kind filter applies to the gallery." \
        if kinds else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Grounding evaluation</title>
<style>{CSS}</style></head>
<body>
<h1>Grounding evaluation</h1>
<p class="meta">{' &middot; '.join(meta)}</p>
<h2>Overall (click accuracy{', and per instruction kind' if kinds else ''})</h2>
{_overall_table(report, names, kinds)}
<div class="filters">{_options('user-filter', 'user', users)}{_options('kind-filter', 'kind', kinds) if kinds else ''}
<span><span id="shown"></span> screenshot(s) shown</span></div>
<h2>Per user (click accuracy)</h2>
{f'<p class="note">{escape(kind_note.strip())}</p>' if kinds else ''}
{_per_user_table(report, names, users)}
{_gains(report)}
<h2>Screenshots</h2>
<p class="legend">{''.join(legend)}</p>
{''.join(sections)}
<script>{JS}</script>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path

