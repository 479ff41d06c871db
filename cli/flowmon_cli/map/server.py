"""`flowmon map --serve HOST:PORT`: a page that redraws the map every few seconds.

One task reads the source every `interval` seconds, lays the map out with Graphviz and keeps the
result; the page (static/, served from here: no CDN, no external asset) polls `/api/map` and swaps the
SVG and the table of `flowmon top`'s health columns. A failed reading keeps the last map and shows the
error. Every blocking step (HTTP to the agents or Prometheus, `dot`) runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowmon_cli import topview
from flowmon_cli.map import dot, graphviz, model
from flowmon_cli.sources import Source

STATIC = Path(__file__).with_name("static")
PAGES = {"/": "index.html", "/map.js": "map.js", "/map.css": "map.css"}
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def parse_listen(text: str) -> tuple[str, int]:
    """`127.0.0.1:8080`, `[::1]:8080` → (host, port); ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r}: give HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port)


@dataclass(frozen=True)
class PageOptions:
    interval: float = 3.0
    by_zone: bool = False
    max_edges: int = model.DEFAULT_MAX_EDGES
    title: str = "flowmon service map"


def payload(service_map: model.ServiceMap, svg: str, source: str, interval: float) -> dict[str, Any]:
    """Pure: what /api/map answers for one drawn map."""
    per_second = service_map.per_second
    return {
        "svg": svg,
        "source": source,
        "perSecond": per_second,
        "refreshSeconds": interval,
        "note": service_map.note(),
        "nodes": [n.id for n in service_map.nodes],
        "columns": list(topview.columns(per_second)),
        "rows": [
            {
                "edge": f"edge:{e.client}->{e.server}",
                "cells": list(topview.row_cells(model.health_row(e), per_second)),
                "violation": e.violations > 0,
                "trouble": e.troubled or e.retransmits > 0,
            }
            for e in service_map.edges
        ],
    }


@dataclass
class LiveMap:
    """The latest drawn map (or the error of the latest reading) and how many were drawn."""

    source: Source
    options: PageOptions
    latest: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    generation: int = 0

    def draw(self) -> dict[str, Any]:
        """One reading, laid out (blocking: runs in a worker thread)."""
        service_map = model.build(
            self.source.sample(), by_zone=self.options.by_zone, max_edges=self.options.max_edges
        )
        svg = graphviz.layout(dot.render(service_map, self.options.title), "svg").decode()
        return payload(service_map, svg, self.source.describe(), self.options.interval)

    async def refresh_forever(self) -> None:
        while True:
            try:
                self.latest = await asyncio.to_thread(self.draw)
                self.error = ""
            except (OSError, ValueError, graphviz.GraphvizError) as exc:
                self.error = f"{type(exc).__name__}: {exc}"
            self.generation += 1
            await asyncio.sleep(self.options.interval)

    def answer(self) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        return {**self.latest, "error": self.error, "generation": self.generation, "servedAt": now}


def application(live: LiveMap):
    from aiohttp import web

    async def page(request: web.Request) -> web.Response:
        path = STATIC / PAGES[request.path]
        return web.Response(body=path.read_bytes(), content_type=CONTENT_TYPES[path.suffix], charset="utf-8")

    async def api(_request: web.Request) -> web.Response:
        return web.json_response(live.answer(), headers={"Cache-Control": "no-store"})

    async def svg(_request: web.Request) -> web.Response:
        return web.Response(text=live.latest.get("svg", ""), content_type="image/svg+xml")

    async def start_refreshing(app: web.Application):
        task = asyncio.create_task(live.refresh_forever())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app = web.Application()
    for route in PAGES:
        app.router.add_get(route, page)
    app.router.add_get("/api/map", api)
    app.router.add_get("/map.svg", svg)
    app.cleanup_ctx.append(start_refreshing)
    return app


def serve(live: LiveMap, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM; prints the address once listening."""
    from aiohttp import web

    def announce(*_args: Any) -> None:
        shown = f"[{host}]" if ":" in host else host
        print(f"flowmon map: serving http://{shown}:{port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)

    web.run_app(application(live), host=host, port=port, print=announce, handle_signals=True)
