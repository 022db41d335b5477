"""The self-contained report page (`rlt.report.build_report` writes it): the comparison table, the plots inlined as
PNG data URIs, each run's latest samples and its evaluation / comparison results (`rlt.evaluate`, `rlt.compare`)."""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rlt.report import SAMPLES_FILE, Run, _cell, _number, _short, read_records

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.2em; margin-top: 1.6em; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.8em 0; }
th, td { border: 1px solid #bbb; padding: 3px 7px; text-align: right; }
th { background: #eee; } td.text, th.text { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.4em 0; }
pre { background: #f6f6f6; padding: 0.5em; white-space: pre-wrap; word-break: break-word; max-height: 20em;
      overflow: auto; font-size: 0.85em; }
.meta { color: #666; font-size: 0.9em; } .wide { overflow-x: auto; }
"""


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], titles: Sequence[str]) -> str:
    """The comparison table as the text one: a row per column of the table, a column per run, titled by `titles`."""
    out = ['<div class="wide"><table>',
           "<tr><th></th>" + "".join(f"<th>{html.escape(t)}</th>" for t in titles) + "</tr>"]
    for i, name in enumerate(header):
        cells = "".join(("<td>" if row[i] is None or _number(row[i]) is not None else '<td class="text">')
                        + f"{html.escape(_cell(row[i]))}</td>" for row in rows)
        out.append(f'<tr><th class="text">{html.escape(name)}</th>{cells}</tr>')
    out.append("</table></div>")
    return "\n".join(out)


def _images(paths: Iterable[Path]) -> str:
    return "\n".join(f'<img alt="{html.escape(p.stem)}" src="{_png_data_uri(p)}">' for p in paths)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _samples_html(run_dir: Path, n: int) -> str:
    rows = read_records(run_dir / SAMPLES_FILE)[-n:] if n > 0 else []
    if not rows:
        return ""
    parts = [f"<h3>Samples (the last {len(rows)} of {SAMPLES_FILE})</h3>"]
    for row in rows:
        meta = ", ".join(f"{k}={_short(v)}" for k, v in row.items()
                         if k not in ("prompt", "completion") and not isinstance(v, list | dict))
        parts.append(f'<p class="meta">{html.escape(meta)}</p>')
        for part in ("prompt", "completion"):
            if part in row:
                text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(row[part]))  # visible, valid HTML
                text = text if len(text) <= 4000 else text[:4000] + " ..."
                parts.append(f"<div class=\"meta\">{part}</div><pre>{html.escape(text)}</pre>")
    return "\n".join(parts)


EVAL_RESULT_KEYS = ("data", "split", "n", "accuracy", "strict_accuracy", "pass_at_k", "mean_completion_tokens",
                    "max_new_tokens", "system_prompt")


def _results_html(run_dir: Path) -> str:
    """What the tools after training left in the run dir: `rlt.evaluate`'s eval/*.json (a column each) and
    `rlt.compare`'s compare/compare.md."""
    parts = []
    evals = []
    for path in sorted((run_dir / "eval").glob("*.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(result, dict) and "accuracy" in result:
            values = [result.get(k) for k in EVAL_RESULT_KEYS]
            evals.append((path.stem, [v[:77] + "..." if isinstance(v, str) and len(v) > 80 else v for v in values]))
    if evals:
        parts += [f"<h3>Evaluation (python -m rlt.evaluate, {len(evals)} in eval/)</h3>",
                  _html_table(EVAL_RESULT_KEYS, [row for _, row in evals], [name for name, _ in evals])]
    compare = run_dir / "compare" / "compare.md"
    if compare.is_file():
        text = _CONTROL.sub(" ", compare.read_text(encoding="utf-8", errors="replace"))
        parts += ["<h3>Comparison (python -m rlt.compare, compare/compare.md)</h3>", f"<pre>{html.escape(text)}</pre>"]
    return "\n".join(parts)


def render_html(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]], overlay: Sequence[Path],
                runs: Sequence[tuple[Run, Sequence[Path]]], *, last: int, samples: int = 4) -> str:
    """One self-contained page: the table, the overlaid plots, each run's plots and a few samples; images are
    inline data URIs, every text is escaped, nothing is fetched."""
    body = [f"<h1>{html.escape(title)}</h1>",
            f'<p class="meta">{len(runs)} run(s); "mean{last}" is the mean of the last {last} logged values; best '
            "is the max of rewards / accuracies, the min of losses / KL.</p>",
            "<h2>Comparison</h2>" if len(runs) > 1 else "<h2>Summary</h2>",
            _html_table(header, rows, [run.label or run.path.name for run, _ in runs])]
    if overlay:
        body += ["<h2>All runs</h2>", _images(overlay)]
    for run, plots in runs:
        body.append(f"<h2>{html.escape(run.label or run.path.name)}</h2>")
        body.append(f'<p class="meta">{html.escape(str(run.path))}</p>')
        if len(runs) > 1:
            body.append("<details><summary>plots</summary>")
        body.append(_images(plots) if plots else '<p class="meta">no metrics logged</p>')
        if len(runs) > 1:
            body.append("</details>")
        body.append(_samples_html(run.path, samples))
        body.append(_results_html(run.path))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(b for b in body if b) + "\n</body></html>\n")
