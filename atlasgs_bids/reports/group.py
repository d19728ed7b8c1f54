"""The group report: robust outlier flags over the group QC table and ``group_qc.html`` beside ``group_qc.tsv``.

An outlier is a value more than ``k`` robust standard deviations from the median of its metric, among the rows of the
same modality: ``|x - median| > k * 1.4826 * MAD`` (MAD, the median absolute deviation; 1.4826 MAD estimates the
standard deviation of normal data), with ``k = 3.5`` (Iglewicz & Hoaglin) by default. The robust SD is floored at
``REL_FLOOR`` (1 %) of the median's magnitude, so a group whose values agree to three digits does not flag the one
that differs in the third. Fewer than ``MIN_ROWS`` values, or a zero spread, flag nothing.
"""
from __future__ import annotations

import html
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from atlasgs_bids.atomic import atomic_write_bytes
from atlasgs_bids.reports import figures as fg
from atlasgs_bids.reports.subject import doc_ref

K_MAD = 3.5
MIN_ROWS = 4
#: The robust SD is at least this fraction of |median| (values that agree to within a percent are not outliers).
REL_FLOOR = 0.01
#: Metrics checked for outliers (when present in the table), with the direction that is bad (for the captions).
OUTLIER_METRICS: dict[str, str] = {
    "registration_ncc": "low", "registration_mask_dice": "low", "registration_spread_mm": "high",
    "heldout_psnr": "low", "heldout_ncc": "low", "heldout_mae": "high", "heldout_gain_db": "low", "relative_residual": "high", "runtime_seconds": "high",
    "sd_median": "high",
}


def robust_band(values: Sequence[float | None], k: float = K_MAD, min_rows: int = MIN_ROWS,
                rel_floor: float = REL_FLOOR) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Outlier mask and inlier band ``(median - k s, median + k s)``, ``s = max(1.4826 MAD, rel_floor |median|)``,
    over the finite values.

    Returns ``(mask, band)``: ``mask`` has one bool per input (False for missing values); ``band`` is None when
    fewer than ``min_rows`` finite values or a zero ``s`` (then nothing is flagged).

    >>> m, band = robust_band([1.0, 1.1, 0.9, 1.0, 1.05, 9.0])
    >>> m.tolist()
    [False, False, False, False, False, True]
    """
    v = np.array([np.nan if x is None else float(x) for x in values], dtype=float)
    ok = np.isfinite(v)
    mask = np.zeros(v.shape, dtype=bool)
    if ok.sum() < min_rows:
        return mask, None
    med = float(np.median(v[ok]))
    s = max(1.4826 * float(np.median(np.abs(v[ok] - med))), rel_floor * abs(med))
    if not s > 0:
        return mask, None
    band = (med - k * s, med + k * s)
    mask[ok] = (v[ok] < band[0]) | (v[ok] > band[1])
    return mask, band


def _float(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def add_outlier_columns(rows: list[dict[str, Any]], k: float = K_MAD) -> dict[tuple[str, str], tuple[float, float]]:
    """Add ``outlier_<metric>`` (True/False; absent when not computed) and ``outliers`` (metrics, ``;``-joined,
    ``n/a`` when none) to the ``ok`` rows, in place, per modality. Returns (modality, metric) -> inlier band."""
    bands: dict[tuple[str, str], tuple[float, float]] = {}
    ok_rows = [r for r in rows if r.get("status") == "ok"]
    for modality in sorted({str(r.get("modality")) for r in ok_rows}):
        group = [r for r in ok_rows if str(r.get("modality")) == modality]
        for metric in OUTLIER_METRICS:
            vals = [_float(r.get(metric)) for r in group]
            if all(v is None for v in vals):
                continue
            mask, band = robust_band(vals, k)
            if band is None:
                continue
            bands[(modality, metric)] = band
            for r, flag, v in zip(group, mask, vals):
                if v is not None:
                    r[f"outlier_{metric}"] = bool(flag)
    for r in ok_rows:
        names = [m for m in OUTLIER_METRICS if r.get(f"outlier_{m}")]
        r["outliers"] = ";".join(names) if names else "n/a"
    return bands


# ------------------------------------------------------------------------------------------------------------ HTML
CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
main{max-width:1240px;margin:0 auto;padding:16px 24px 40px;background:#fff}h1{font-size:1.6em}
h2{border-bottom:2px solid #d0d7de;padding-bottom:4px;margin-top:1.5em}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:.86em}td.name{white-space:nowrap}td,th{border:1px solid #d0d7de;padding:3px 7px;text-align:right}
th{background:#f0f3f6;position:sticky;top:0}td:first-child,th:first-child{text-align:left}
.bad{background:#ffebe9;color:#82071e;font-weight:600}.failed{background:#ffebe9}.missing{background:#fff8c5}
.plots{display:flex;flex-wrap:wrap;gap:10px}.plots figure{margin:0}.plots svg{width:300px;height:auto}
.muted{color:#57606a;font-size:.9em}.counts span{margin-right:16px;font-weight:600}
th.sort{cursor:pointer;user-select:none}th.sort:after{content:" \\2195";color:#8c959f}
.tools{margin:.5em 0;display:flex;gap:16px;align-items:center}.tools input[type=search]{width:22em;padding:3px 6px}
"""
#: Sorting and filtering of the targets table, inline (the page makes no network reference). Filter text: every
#: word must appear in the row; ``#filter=<text>`` and ``#flagged`` in the address preset them.
SCRIPT = """
(function(){
var table=document.getElementById('targets'),body=table.tBodies[0],rows=Array.prototype.slice.call(body.rows);
var box=document.getElementById('filter'),only=document.getElementById('only-flagged'),shown=document.getElementById('shown');
function apply(){var words=box.value.toLowerCase().split(/\\s+/).filter(Boolean),n=0;
 rows.forEach(function(r){var t=r.getAttribute('data-text'),ok=(!only.checked||r.getAttribute('data-flagged')==='1')
  &&words.every(function(w){return t.indexOf(w)>=0;});r.style.display=ok?'':'none';if(ok)n++;});
 shown.textContent=n+' of '+rows.length+' rows shown';}
function key(r,i){var c=r.cells[i],v=c?c.getAttribute('data-v'):null;
 if(v===null||v===''){var t=c?c.textContent:'';return [2,t];}var f=parseFloat(v);return isNaN(f)?[1,v]:[0,f];}
Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){th.className='sort';var asc=true;
 th.addEventListener('click',function(){rows.sort(function(a,b){var x=key(a,i),y=key(b,i);
  if(x[0]!==y[0])return x[0]-y[0];return (x[1]<y[1]?-1:x[1]>y[1]?1:0)*(asc?1:-1);});
  rows.forEach(function(r){body.appendChild(r);});asc=!asc;});});
var h=decodeURIComponent(location.hash.slice(1));
h.split('&').forEach(function(p){if(p.indexOf('filter=')===0)box.value=p.slice(7);if(p==='flagged')only.checked=true;});
box.addEventListener('input',apply);only.addEventListener('change',apply);apply();
})();
"""
#: Above this many failed or missing participants their table starts folded (the counts say how many).
FOLD_ROWS = 50


def row_order(row: dict[str, Any]) -> int:
    """Sort key of the table: failed, missing, flagged or outlier targets, then the rest (stable within)."""
    status = row.get("status")
    if status == "failed":
        return 0
    if status == "missing":
        return 1
    flagged = row.get("qc_flags") not in (None, "", "n/a") or row.get("outliers") not in (None, "", "n/a")
    return 2 if flagged else 3
_SHORT = {"registration_ncc": "reg NCC", "registration_mask_dice": "reg Dice",
          "registration_spread_mm": "reg spread (mm)", "heldout_psnr": "held-out PSNR",
          "heldout_ncc": "held-out NCC", "heldout_mae": "held-out MAE", "heldout_cubic_psnr": "cubic PSNR",
          "heldout_gain_db": "gain (dB)", "relative_residual": "rel. residual", "runtime_seconds": "runtime (s)",
          "sd_median": "SD median"}


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _cell(x: Any) -> str:
    f = _float(x)
    if f is None:
        return _e("n/a" if x in (None, "") else x)
    return f"{f:.3f}" if abs(f) < 1e4 else f"{f:.3g}"


def _sort_value(x: Any) -> str:
    """The value a table column sorts by: the number in full precision, else empty (sorted last)."""
    f = _float(x)
    return "" if f is None else repr(f)


def _n(count: int, noun: str) -> str:
    """``1 target``, ``2 targets``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _inline_svg(svg: str) -> str:
    """SVG text without its XML prolog and DOCTYPE, for inlining in HTML."""
    return re.sub(r"^.*?(<svg\b)", r"\1", svg, count=1, flags=re.S)


def render_group_html(rows: Sequence[dict[str, Any]], bands: dict[tuple[str, str], tuple[float, float]], *,
                      k: float = K_MAD, version: str = "", report_exists: Sequence[str] = ()) -> str:
    """``group_qc.html``: counts, one strip/box plot per metric and modality (inline SVG), missing and failed
    participants, and the table with outliers and flags highlighted and a link to each ``sub-X.html``."""
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") == "failed"]
    missing = [r for r in rows if r.get("status") == "missing"]
    flagged = [r for r in ok if r.get("qc_flags") not in (None, "", "n/a")]
    outl = [r for r in ok if r.get("outliers") not in (None, "", "n/a")]
    body = ["<h1>atlasgs-bids group QC</h1>",
            f"<p class='muted'>Generated {time.strftime('%Y-%m-%d %H:%M:%S')}"
            f"{' by atlasgs-bids ' + _e(version) if version else ''} from the derivatives' sidecars "
            f"(<a href='group_qc.tsv'>group_qc.tsv</a>). Outlier: more than {k:g} robust SD (1.4826 MAD, at least "
            f"{REL_FLOOR:.0%} of the median) from the median of the same modality; shaded band in the plots; needs "
            f"at least {MIN_ROWS} rows. What each column means: {doc_ref('qc.md', 'group-group_qctsv-group_qchtml')}; "
            f"failed participants and what to do: {doc_ref('troubleshooting.md')}.</p>",
            "<p class='counts'>"
            f"<span>{_n(len({r['participant_id'] for r in ok}), 'participant')} with outputs "
            f"({_n(len(ok), 'target')})</span>"
            f"<span class='{'bad' if failed else ''}'>{len(failed)} failed</span>"
            f"<span class='{'bad' if missing else ''}'>{len(missing)} missing</span>"
            f"<span class='{'bad' if flagged else ''}'>{_n(len(flagged), 'target')} with QC flags</span>"
            f"<span class='{'bad' if outl else ''}'>{_n(len(outl), 'target')} with outliers</span></p>"]
    if failed or missing:
        n_bad = len(failed) + len(missing)
        body.append(f"<h2>Failed or missing participants</h2><details{'' if n_bad > FOLD_ROWS else ' open'}>"
                    f"<summary>{len(failed)} failed, {len(missing)} missing</summary><table><tr><th>participant</th>"
                    "<th>session</th><th>status</th><th>error</th></tr>")
        for r in [*failed, *missing]:
            body.append(f"<tr class='{_e(r['status'])}'><td>{_e(r['participant_id'])}</td>"
                        f"<td>{_e(r.get('session_id', 'n/a'))}</td><td>{_e(r['status'])}</td>"
                        f"<td>{_e(r.get('error') or '')}</td></tr>")
        body.append("</table></details>")
    body.append("<h2>Distributions</h2>")
    for modality in sorted({str(r.get("modality")) for r in ok}):
        group = [r for r in ok if str(r.get("modality")) == modality]
        plots = []
        for metric in OUTLIER_METRICS:
            vals = [_float(r.get(metric)) for r in group]
            if all(v is None for v in vals):
                continue
            labels = [f"{r['participant_id']}" + (f" {r['session_id']}" if r.get("session_id") not in (None, "n/a")
                                                  else "") for r in group]
            svg = fg.group_plot_svg(vals, [bool(r.get(f"outlier_{metric}")) for r in group], labels,
                                    metric=_SHORT.get(metric, metric), band=bands.get((modality, metric)))
            plots.append(f"<figure>{_inline_svg(svg)}</figure>")
        body.append(f"<h3>{_e(modality)} ({_n(len(group), 'target')})</h3><div class='plots'>{''.join(plots)}</div>")
    cols = [m for m in _SHORT if any(m in r for r in ok)]
    body.append("<h2>Targets</h2><p class='muted'>Failed and missing participants first, then targets with QC flags "
                "or outliers, then the rest. Click a column to sort; the filter keeps rows holding every word typed "
                "(a participant, a modality, a flag).</p><div class='tools'><input type='search' id='filter' "
                "placeholder='filter, e.g. sub-0042 or FLAIR' aria-label='filter the table'><label><input "
                "type='checkbox' id='only-flagged'> flagged, outliers, failed or missing only</label>"
                "<span id='shown' class='muted'></span></div>")
    body.append("<div class='scroll'><table id='targets'><thead><tr><th>participant</th><th>session</th>"
                "<th>target</th><th>status</th>" + "".join(f"<th>{_e(_SHORT[c])}</th>" for c in cols)
                + "<th>QC flags</th><th>outliers</th></tr></thead><tbody>")
    for r in sorted(rows, key=row_order):
        pid = r["participant_id"]
        link = f"<a href='{_e(pid)}.html'>{_e(pid)}</a>" if pid in report_exists else _e(pid)
        cells = "".join(f"<td class='{'bad' if r.get(f'outlier_{c}') else ''}' data-v='{_e(_sort_value(r.get(c)))}'>"
                        f"{_cell(r.get(c))}</td>" for c in cols)
        flags = r.get("qc_flags") if r.get("qc_flags") not in (None, "") else "n/a"
        status_cls = "bad" if r.get("status") != "ok" else ""
        target = r.get("target") or "n/a"
        target = Path(target).name if target != "n/a" else target
        outliers = ", ".join(_SHORT.get(m, m) for m in str(r.get("outliers", "n/a")).split(";"))
        text = " ".join(str(x) for x in (pid, r.get("session_id", ""), target, r.get("modality", ""), r.get("status"),
                                         flags, outliers, r.get("error", "")))
        body.append(f"<tr data-flagged='{int(row_order(r) < 3)}' data-text='{_e(text.lower())}'><td>{link}</td>"
                    f"<td>{_e(r.get('session_id', 'n/a'))}</td><td class='name'>{_e(target)}</td>"
                    f"<td class='{status_cls}'>{_e(r.get('status'))}</td>{cells}"
                    f"<td class='{'bad' if flags != 'n/a' else ''}'>{_e(flags)}</td>"
                    f"<td class='{'bad' if r.get('outliers') not in (None, 'n/a') else ''}'>{_e(outliers)}</td></tr>")
    body.append(f"</tbody></table></div><script>{SCRIPT}</script>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>atlasgs-bids group QC</title>"
            f"<style>{CSS}</style></head><body><main>" + "".join(body) + "</main></body></html>\n")


def write_group_html(output_dir: str | os.PathLike, rows: Sequence[dict[str, Any]],
                     bands: dict[tuple[str, str], tuple[float, float]], *, version: str = "") -> Path:
    """Write ``<output_dir>/group_qc.html`` (atomic); participants whose ``sub-X.html`` exists are linked."""
    out = Path(output_dir)
    exists = [p.name[:-5] for p in out.glob("sub-*.html")]
    text = render_group_html(rows, bands, version=version, report_exists=exists)
    return atomic_write_bytes(out / "group_qc.html", text.encode())
