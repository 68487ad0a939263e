"""Benchmarks of tokenwire against a bare WebSocket server and the common tutorial bridge.

``python -m bench.run [--quick] [--out docs/benchmarks.md]`` starts everything (embedded NATS,
gateways, workers, the Dify simulator, the two baselines), drives it with multi-process asyncio
WebSocket clients and writes the report with its charts. Nothing here is imported by tokenwire.
"""
