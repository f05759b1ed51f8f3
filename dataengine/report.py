"""A static HTML report of a shard set, viewable offline in any browser.

``vlmr inspect SOURCE report --out DIR`` writes::

    DIR/index.html            the summary, the histogram and the gallery (inline CSS, no scripts)
    DIR/answer_lengths.png    answer lengths per stage, the easy/hard split marked
    DIR/thumbs/KEY.jpg        the contact sheets of the gallery samples, copied from the shards

Images are relative files, so the folder can be copied or zipped as it is. The histogram is
drawn with PIL (no plotting library). One pass over the shards does everything: it reads every
sample's json (answer lengths) and all members of the few gallery samples, evenly spread over
each stage so that short and long answers both appear.

Run::

    vlmr inspect shards/demo report --out runs/demo/report
    python -c "from dataengine import report, inspection as i; report.write_report(i.open_shard_set('shards/demo'), 'r')"
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataengine import inspection, schema

HISTOGRAM_NAME = "answer_lengths.png"
THUMBS_DIR = "thumbs"
STAGE_COLOURS = {schema.STAGE_EASY: (42, 157, 143), schema.STAGE_HARD: (231, 111, 81),
                 schema.STAGE_PAIRS: (87, 117, 180)}
OTHER_COLOURS = [(138, 90, 160), (200, 160, 40), (90, 90, 90)]


def stage_colour(name: str, position: int) -> tuple[int, int, int]:
    return STAGE_COLOURS.get(name, OTHER_COLOURS[position % len(OTHER_COLOURS)])


# ============================================================================ the histogram

def _nice_step(span: float, ticks: int) -> float:
    """A 1/2/5 x 10^k step that cuts ``span`` into about ``ticks`` parts."""
    raw = max(span, 1e-9) / max(1, ticks)
    power = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 5, 10):
        if raw <= mult * power:
            return mult * power
    return 10 * power


def render_histogram(stages: list[tuple[str, dict[int, int]]], split: tuple[int, int] | None = None, *,
                     width: int = 760, height: int = 380, bins: int = 40):
    """A PIL image: stacked bars of answer lengths (tokens) per stage, the split dashed.

    ``stages``: (name, {answer tokens: samples}) in stream order; bins are integer-aligned
    and shared by all stages, so a bin that straddles the split shows both colours.
    ``split``: (longest easy answer, shortest hard answer); the line goes between them.
    """
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)
    left, right, top, bottom = 56, 16, 34, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.text((left, 8), "answer length (tokens) per stage", fill="black", font=font)
    values = [v for _, counts in stages for v in counts]
    if not values:
        draw.text((left, top + plot_h // 2), "no samples", fill="gray", font=font)
        return image
    lo, hi = min(values), max(values)
    edges = inspection.histogram({v: 1 for v in values}, bins=bins, lo=lo, hi=hi)
    width_tokens = edges[0].hi - edges[0].lo + 1
    per_stage = [inspection.histogram(counts, bins=bins, lo=lo, hi=hi) if counts else [] for _, counts in stages]
    totals = [sum(b[i].count for b in per_stage if b) for i in range(len(edges))]
    top_count = max(totals) or 1
    step = max(1, int(_nice_step(top_count, 5)))  # counts are whole samples
    y_max = math.ceil(top_count / step) * step
    x_lo, x_hi = lo, lo + len(edges) * width_tokens  # bar i spans [lo + i*w, lo + (i+1)*w)

    def x_of(tokens: float) -> float:
        return left + (tokens - x_lo) / (x_hi - x_lo) * plot_w

    def y_of(count: float) -> float:
        return top + plot_h - count / y_max * plot_h

    # grid and y ticks
    tick = 0
    while tick <= y_max + 1e-9:
        y = y_of(tick)
        draw.line([(left, y), (left + plot_w, y)], fill=(230, 230, 230))
        label = str(int(tick))
        draw.text((left - 6 - draw.textlength(label, font=small), y - 7), label, fill="black", font=small)
        tick += step
    # bars, stacked in stream order of stages
    for i in range(len(edges)):
        base = 0
        for s, (name, _) in enumerate(stages):
            if not per_stage[s]:
                continue
            n = per_stage[s][i].count
            if n:
                x0, x1 = x_of(x_lo + i * width_tokens) + 1, x_of(x_lo + (i + 1) * width_tokens) - 1
                draw.rectangle([x0, y_of(base + n), max(x0, x1), y_of(base)], fill=stage_colour(name, s))
                base += n
    # axes and x ticks
    draw.line([(left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")
    draw.line([(left, top), (left, top + plot_h)], fill="black")
    xstep = max(1, int(_nice_step(x_hi - x_lo, 8)))
    tick_x = math.ceil(x_lo / xstep) * xstep
    while tick_x <= x_hi:
        x = x_of(tick_x)
        draw.line([(x, top + plot_h), (x, top + plot_h + 4)], fill="black")
        label = str(tick_x)
        draw.text((x - draw.textlength(label, font=small) / 2, top + plot_h + 6), label, fill="black", font=small)
        tick_x += xstep
    axis = "answer tokens"
    draw.text((left + plot_w / 2 - draw.textlength(axis, font=small) / 2, height - 18), axis, fill="black", font=small)
    draw.text((left - 6 - draw.textlength("samples", font=small), top - 16), "samples", fill="black", font=small)
    # the split: a dashed vertical line with its value
    if split is not None:
        # bar t spans [t, t+1): the line sits midway between the longest easy and shortest hard bars
        x = x_of(min(max((split[0] + 1 + split[1]) / 2, x_lo), x_hi))
        y = top
        while y < top + plot_h:
            draw.line([(x, y), (x, min(y + 6, top + plot_h))], fill="black", width=2)
            y += 10
        label = f"easy <= {split[0]} | hard >= {split[1]} tokens"
        tw = draw.textlength(label, font=small)
        lx = x + 6 if x + 6 + tw < left + plot_w else x - 6 - tw
        draw.rectangle([lx - 3, top + 4, lx + tw + 3, top + 20], fill="white")
        draw.text((lx, top + 5), label, fill="black", font=small)
    # legend: one line above the plot, right-aligned
    lx = left + plot_w
    for s in reversed(range(len(stages))):
        name, counts = stages[s]
        label = f"{name}: {sum(counts.values())} samples"
        lx -= draw.textlength(label, font=small) + 16
        draw.rectangle([lx, 11, lx + 10, 21], fill=stage_colour(name, s))
        draw.text((lx + 14, 9), label, fill="black", font=small)
        lx -= 12
    return image


# ============================================================================ the page

@dataclass
class GalleryItem:
    stage: str
    key: str
    index: int
    answer_tokens: Any
    question: str
    answer: str
    thumb: str | None
    """Path of the copied contact sheet, relative to the page."""
    fields: dict[str, Any] = field(default_factory=dict)
    """narrative / preference / other fields worth showing."""


@dataclass
class Report:
    path: Path
    """The index.html written."""
    summary: inspection.Summary
    gallery: list[GalleryItem]


def gallery_picks(shard_set: inspection.ShardSet, count: int) -> dict[str, set[int]]:
    """Stage -> positions of the gallery samples: evenly spread, each stage by its share (>= 1)."""
    stages = [st for st in shard_set.manifest.stages if st.samples]
    total = sum(st.samples for st in stages)
    picks: dict[str, set[int]] = {}
    if count <= 0 or not total:
        return picks
    for st in stages:
        k = min(st.samples, max(1, round(count * st.samples / total)))
        picks[st.name] = {int(i * st.samples / k + st.samples / (2 * k)) for i in range(k)}
    return picks


def write_report(shard_set: inspection.ShardSet, out: str | os.PathLike, *, gallery: int = 24,
                 bins: int = 40) -> Report:
    """Write ``out/index.html``, the histogram PNG and the gallery's contact sheets."""
    out = Path(out)
    (out / THUMBS_DIR).mkdir(parents=True, exist_ok=True)
    picks = gallery_picks(shard_set, gallery)
    items: list[GalleryItem] = []

    def picked(stage: str, position: int, key: str) -> bool:
        return position in picks.get(stage, ())

    def keep(raw: inspection.RawSample) -> None:
        items.append(gallery_item(raw, out))

    summary = inspection.summarize(shard_set, scan=True, full=picked, on_sample=keep)
    image = render_histogram([(s.name, s.answer_tokens or {}) for s in summary.stages], summary.split, bins=bins)
    tmp = out / f".{HISTOGRAM_NAME}.tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, out / HISTOGRAM_NAME)
    page = render_page(summary, items)
    path = schema.write_text_atomic(out / "index.html", page)
    return Report(path=path, summary=summary, gallery=items)


def gallery_item(raw: inspection.RawSample, out: Path) -> GalleryItem:
    data = raw.json()
    question, answer = inspection.question_and_answer(data)
    thumb = None
    if schema.THUMB in raw.members:
        name = f"{THUMBS_DIR}/{schema.sample_key(raw.key)}.jpg"
        schema.write_bytes_atomic(out / name, raw.members[schema.THUMB])
        thumb = name
    shown = {k: data[k] for k in ("narrative", *inspection.PREFERENCE_FIELDS) if k in data}
    known = set(inspection.REQUIRED_FIELDS) | {"source", "stage", *shown}
    shown.update({k: v for k, v in data.items() if k not in known})
    return GalleryItem(stage=raw.stage, key=raw.key, index=raw.index, answer_tokens=data.get("answer_tokens"),
                       question=question, answer=answer, thumb=thumb, fields=shown)


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px auto;
       max-width: 1180px; padding: 0 16px; color: #222; background: #fafafa; }
h1 { font-size: 22px; margin-bottom: 2px; } h2 { font-size: 17px; margin-top: 28px; }
.sub { color: #666; margin-top: 0; word-break: break-all; }
table { border-collapse: collapse; background: white; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.figures { display: flex; gap: 28px; flex-wrap: wrap; align-items: flex-start; }
.chip { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
img.hist { border: 1px solid #ddd; background: white; max-width: 100%; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 14px; }
.card { background: white; border: 1px solid #ddd; border-radius: 6px; padding: 10px; overflow: hidden; }
.card img { width: 100%; height: auto; image-rendering: auto; border-radius: 3px; background: #eee; }
.noimg { height: 60px; display: flex; align-items: center; justify-content: center; color: #999; background: #f3f3f3; }
.meta { color: #555; font-size: 12px; margin: 6px 0; }
.tag { color: white; border-radius: 3px; padding: 0 5px; font-size: 12px; }
.q { font-weight: 600; margin: 4px 0; } .a { white-space: pre-wrap; margin: 4px 0; }
details { margin-top: 4px; font-size: 13px; } pre { white-space: pre-wrap; margin: 4px 0; }
code { font-size: 12px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _rgb(colour: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % colour


def _clip(text: str, limit: int) -> tuple[str, bool]:
    return (text, False) if len(text) <= limit else (text[:limit].rstrip() + "…", True)


def render_page(summary: inspection.Summary, items: list[GalleryItem]) -> str:
    s = summary
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>shards: {_e(s.source)}</title><style>{CSS}</style></head><body>",
        f"<h1>Shard set report</h1><p class=\"sub\">{_e(s.source)} · format {_e(s.format)}"
        + (f" · derived from {_e(s.derived_from)}" if s.derived_from else "") + "</p>",
        "<h2>Summary</h2>",
        f"<p>{s.samples} samples in {sum(st.shards for st in s.stages)} shards, {inspection.human_bytes(s.bytes)}; "
        f"{s.failures} item(s) left out at build time.</p>",
        "<div class=\"figures\"><table><tr><th>stage</th><th>shards</th><th>samples</th><th>bytes</th>"
        "<th>answer tokens</th></tr>",
    ]
    for i, st in enumerate(s.stages):
        parts.append(f"<tr><td><span class=\"chip\" style=\"background:{_rgb(stage_colour(st.name, i))}\"></span>"
                     f"{_e(st.name)}</td><td class=\"num\">{st.shards}</td><td class=\"num\">{st.samples}</td>"
                     f"<td class=\"num\">{inspection.human_bytes(st.bytes)}</td><td class=\"num\">"
                     f"{st.min_answer_tokens}–{st.max_answer_tokens}</td></tr>")
    parts.append("</table>")
    log_ = s.failure_log
    if log_.present and (log_.count or log_.bad_lines):
        parts.append("<table><tr><th>left out at build (failures.jsonl)</th><th>count</th></tr>")
        for reason, n in log_.reasons.most_common():
            parts.append(f"<tr><td>{_e(reason)}</td><td class=\"num\">{n}</td></tr>")
        if log_.bad_lines:
            parts.append(f"<tr><td>unreadable lines</td><td class=\"num\">{len(log_.bad_lines)}</td></tr>")
        parts.append(f"<tr><td>samples left out</td><td class=\"num\">{log_.samples_left_out}</td></tr></table>")
    parts.append("</div>")
    split = s.split
    parts.append("<h2>Answer lengths</h2>")
    parts.append(f'<img class="hist" src="{HISTOGRAM_NAME}" width="760" height="380" '
                 f'alt="histogram of answer lengths per stage">')
    if split is not None:
        parts.append(f"<p>Curriculum split (dashed): easy answers have at most {split[0]} tokens, "
                     f"hard answers at least {split[1]}.</p>")
    parts.append(f"<h2>Gallery ({len(items)} samples, spread over each stage)</h2><div class=\"gallery\">")
    order = {st.name: i for i, st in enumerate(s.stages)}
    for item in sorted(items, key=lambda it: it.index):
        parts.append(_card(item, order.get(item.stage, 0)))
    parts.append("</div>")
    if s.settings:
        parts.append("<h2>Build settings</h2><table>")
        for key, value in s.settings.items():
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            parts.append(f"<tr><th>{_e(key)}</th><td><code>{_e(text)}</code></td></tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _card(item: GalleryItem, position: int) -> str:
    colour = _rgb(stage_colour(item.stage, position))
    if item.thumb:
        picture = f'<img src="{_e(item.thumb)}" alt="contact sheet of {_e(item.key)}" loading="lazy">'
    else:
        picture = '<div class="noimg">no contact sheet</div>'
    answer, cut = _clip(item.answer, 360)
    out = [f'<div class="card" id="{_e(item.key)}">', picture,
           f'<div class="meta"><span class="tag" style="background:{colour}">{_e(item.stage)}</span> '
           f"#{item.index} · <code>{_e(item.key)}</code> · {_e(item.answer_tokens)} answer tokens</div>",
           f'<div class="q">Q: {_e(item.question)}</div>', f'<div class="a">A: {_e(answer)}</div>']
    if cut:
        out.append(f"<details><summary>whole answer</summary><pre>{_e(item.answer)}</pre></details>")
    for key, value in item.fields.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, indent=1)
        if len(text) <= 60 and "\n" not in text:  # short values inline, long ones folded
            out.append(f'<div class="meta">{_e(key)}: <code>{_e(text)}</code></div>')
        else:
            out.append(f"<details><summary>{_e(key)}</summary><pre>{_e(text)}</pre></details>")
    out.append("</div>")
    return "".join(out)
