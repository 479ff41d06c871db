"""`flowmon map`: the service map. `model` turns a reading of the flows into workloads and the edges
between them (pure), `dot` writes it as Graphviz DOT (pure), `graphviz` lays it out with Debian's `dot`
(I/O), `server` serves the live page (aiohttp; its page and script are in static/, nothing external).
"""
