"""Servers tokenwire is compared with; neither is part of tokenwire.

* :mod:`bench.baselines.bare_ws`: the ceiling, a bare Starlette WebSocket pushing frames.
* :mod:`bench.baselines.tutorial_bridge`: the common tutorial bridge, re-implemented faithfully.
"""
