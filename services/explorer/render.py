"""The explorer's page, rendered on the server from a snapshot (``collect.py``).

Every string in a snapshot came from a peer, so every one goes through :func:`esc` (HTML
escaping, quotes included) on its way into the page, attribute or text alike; nothing else
inserts peer data. The page also forbids inline scripts (a Content-Security-Policy header, see
``http.py``), so markup that slipped through would still not run. The page is usable without
JavaScript; ``static/app.js`` only refreshes the ``<main>`` part from ``/fragment``.
"""

from __future__ import annotations

import html
import time
from typing import Any

MAX_LISTED = 8  # uids listed per server row before "and N more"


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def num(value: Any, digits: int = 0, unit: str = "") -> str:
    """A number for a cell: '—' when unknown."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "—"
    text = f"{value:,.{digits}f}" if digits else f"{round(value):,}"
    return esc(text + unit)


def _yes(value: Any, yes: str = "yes", no: str = "no") -> str:
    return yes if value else no


def _load_level(rate: float | None, busiest: float) -> int:
    if not rate or busiest <= 0:
        return 0
    return max(1, min(4, round(4 * rate / busiest)))


LEGEND = (
    '<p class="legend">live replicas: <span class="cell alive r1">1</span>'
    '<span class="cell alive r2">2</span><span class="cell alive r3">3+</span> '
    '<span class="cell dead">✕</span> dead · bar: load (optimizer steps/s, relative to the '
    "busiest expert of the grid)</p>"
)


def _grid(grid: dict[str, Any], experts: dict[str, dict[str, Any]]) -> str:
    rates = [experts[u]["steps_per_s"] or 0.0 for r in grid["rows"] for u in r["cells"]]
    busiest = max(rates, default=0.0)
    shape = "\u00d7".join(map(str, grid["shape"])) if grid["shape"] else "unknown shape"
    notes = []
    if not grid["complete"]:
        notes.append("too large to draw whole: only the experts found are shown")
    if grid["truncated"]:
        notes.append("more experts than the explorer keeps: some are left out")
    out = [
        f'<section class="grid" data-grid="{esc(grid["prefix"])}">',
        f"<h2>Grid <code>{esc(grid['prefix'])}</code> <small>{esc(shape)} · "
        f'<span class="ok">{num(grid["alive"])} alive</span> · '
        f'<span class="bad">{num(grid["dead"])} dead</span></small></h2>',
        *(f'<p class="note">{esc(n)}</p>' for n in notes),
        LEGEND,
        '<div class="scroll"><table class="map"><tbody>',
    ]
    for row in grid["rows"]:
        out.append(f'<tr><th scope="row">{esc(row["label"])}</th>')
        for uid in row["cells"]:
            expert = experts[uid]
            coord = uid.rsplit(".", 1)[-1]
            replicas = len(expert["servers"])
            if expert["alive"]:
                level = _load_level(expert["steps_per_s"], busiest)
                cls = f"cell alive r{min(replicas, 3)} l{level}"
                rate = expert["steps_per_s"]
                title = (
                    f"{uid}: {replicas} live replica{'s' * (replicas != 1)} "
                    + (f"({', '.join(expert['servers'])})")
                    + (f", {rate:g} steps/s" if rate else "")
                )
                body = f'<span class="c">{esc(coord)}</span><span class="n">{replicas}</span>'
            else:
                cls = "cell dead"
                gone = expert["unreachable"]
                title = f"{uid}: no live replica" + (
                    f" (declared by {', '.join(gone)}, not answering)" if gone else ""
                )
                body = f'<span class="c">{esc(coord)}</span><span class="n">✕</span>'
            out.append(
                f'<td class="{cls}" data-uid="{esc(uid)}" title="{esc(title)}" '
                f'aria-label="{esc(title)}">{body}</td>'
            )
        out.append("</tr>")
    out.append("</tbody></table></div></section>")
    return "".join(out)


def _table(caption: str, headers: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<section><h2>{esc(caption)}</h2><p class="note">{esc(empty)}</p></section>'
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return (
        f"<section><h2>{esc(caption)} <small>{len(rows)}</small></h2>"
        f'<div class="scroll"><table class="list"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div></section>"
    )


def _state(reachable: bool, error: str = "") -> str:
    if reachable:
        return '<span class="ok">● up</span>'
    return f'<span class="bad" title="{esc(error)}">● down</span>'


def _servers(servers: list[dict[str, Any]]) -> str:
    rows = []
    for s in servers:
        listed = ", ".join(s["experts"][:MAX_LISTED])
        more = s["num_experts"] - min(len(s["experts"]), MAX_LISTED)
        experts = f"{num(s['num_experts'])} <small>{esc(listed)}"
        experts += f" and {more} more</small>" if more > 0 else "</small>"
        queue = "—"
        if s.get("queued") is not None:
            queue = f"{num(s['queued'])} / {num(s.get('max_queue_samples'))}"
        foreign = s.get("foreign_declarations", 0)
        key = f'<code title="{esc(s.get("public_key", ""))}">{esc(s["fingerprint"])}</code>'
        if foreign:
            key += f' <span class="bad" title="declarations of this address signed by other keys">+{num(foreign)} other</span>'  # noqa: E501
        rows.append([
            f"<code>{esc(s['address'])}</code>",
            _state(s["reachable"], s.get("error", "")),
            key,
            experts,
            esc(s.get("expert_class", "")),
            queue,
            num(s.get("max_batch_size")),
            num(s.get("steps")),
            num(s.get("samples_per_s"), 1),
            num(s.get("latency_ms"), 1, " ms"),
            esc(s.get("version", "")) or "—",
            _yes(s.get("tls"), "TLS", "plain") if "tls" in s else "—",
        ])  # fmt: skip
    headers = ["address", "state", "key", "experts", "class", "queued / max", "max batch",
               "steps", "samples/s", "latency", "version", "TLS"]  # fmt: skip
    return _table("Expert servers", headers, rows, "No expert server found in the DHT.")


def _more(fields: dict[str, Any]) -> str:
    return "<br>".join(f"{esc(k)}: {esc(v)}" for k, v in fields.items()) or "—"


def _trainers(trainers: list[dict[str, Any]]) -> str:
    rows = []
    for t in trainers:
        more = {**t.get("announced", {}), **t.get("more", {})}
        rounds = [k for k in more if "round" in k]
        last_round = esc(more.pop(rounds[0])) if rounds else "—"
        rows.append([
            f"<code>{esc(t['run_id'])}</code>",
            f"<code>{esc(t['address'])}</code>",
            _state(t["reachable"], t.get("error", "")),
            f'<code title="{esc(t.get("public_key", ""))}">{esc(t["fingerprint"])}</code>'
            + ("" if t.get("verified", True) else ' <span class="bad">key differs</span>'),
            esc(t.get("state", "")) or "—",
            num(t.get("step")),
            num(t.get("samples_per_s"), 1),
            num(t.get("loss"), 4),
            num(t.get("test_accuracy"), 3),
            last_round,
            esc(f"{t['model']} / {t['dataset']}"),
            _more(more),
        ])  # fmt: skip
    headers = ["run", "address", "state", "key", "phase", "step", "samples/s", "loss",
               "test acc.", "last round", "model / data", "more"]  # fmt: skip
    return _table("Trainers", headers, rows, "No trainer announces itself in the DHT.")


def _dht_nodes(nodes: list[dict[str, Any]]) -> str:
    rows = []
    for n in nodes:
        rows.append([
            f"<code>{esc(n['address'])}</code>",
            _state(n["reachable"], n.get("error", "")),
            f"<code>{esc(n.get('node_id', '')[:16])}</code>",
            _yes(n.get("joined")) if n["reachable"] else "—",
            num(n.get("routing_table_size")),
            num(n.get("stored_records")),
            num(n.get("clock_correction"), 2, " s"),
            num(n.get("latency_ms"), 1, " ms"),
        ])  # fmt: skip
    headers = ["address", "state", "node id", "joined", "routing table", "records",
               "clock corr.", "latency"]  # fmt: skip
    return _table("DHT nodes reached", headers, rows, "No DHT node answered.")


def fragment(snapshot: dict[str, Any] | None) -> str:
    """The ``<main>`` content: what ``/fragment`` serves and the page embeds."""
    if snapshot is None:
        return '<div id="meta" data-updated="0" data-period="2" data-round="0"></div><p class="note">Looking at the swarm…</p>'  # noqa: E501
    experts = {e["uid"]: e for e in snapshot["experts"]}
    alive = sum(e["alive"] for e in snapshot["experts"])
    servers = snapshot["servers"]
    up = sum(s["reachable"] for s in servers)
    trainers = snapshot["trainers"]
    nodes = snapshot["dht_nodes"]
    updated = time.strftime("%H:%M:%S UTC", time.gmtime(snapshot["updated"]))
    out = [
        f'<div id="meta" data-updated="{snapshot["updated"]:.3f}" '
        f'data-period="{snapshot["period"]:g}" data-round="{snapshot["round"]:d}"></div>',
        '<ul class="summary">',
        f"<li><b>{alive}</b> / {len(experts)} experts alive</li>",
        f"<li><b>{up}</b> / {len(servers)} servers up</li>",
        f"<li><b>{sum(t['reachable'] for t in trainers)}</b> / {len(trainers)} trainers up</li>",
        f"<li><b>{sum(n['reachable'] for n in nodes)}</b> DHT nodes</li>",
        f"<li>updated {esc(updated)}</li>",
        "</ul>",
        *(f'<p class="error">{esc(e)}</p>' for e in snapshot["errors"]),
    ]
    if not snapshot["grids"]:
        out.append('<p class="note">No grid found: no expert server announces one, and no '
                   "<code>--prefixes</code> were given.</p>")  # fmt: skip
    out += [_grid(g, experts) for g in snapshot["grids"]]
    out += [_servers(servers), _trainers(trainers), _dht_nodes(nodes)]
    return "\n".join(out)


def page(snapshot: dict[str, Any] | None) -> str:
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>dmoe swarm explorer</title>"
        '<link rel="stylesheet" href="/static/style.css">'
        '<script src="/static/app.js" defer></script></head>'
        '<body><header><h1>dmoe swarm</h1><p id="status" class="status"></p></header>'
        f'<main id="swarm">{fragment(snapshot)}</main>'
        "<footer>What the DHT holds, checked against each peer. For scripts: "
        '<a href="/api/swarm">/api/swarm</a> (JSON).</footer>'
        "</body></html>\n"
    )
