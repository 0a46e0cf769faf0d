"""Benchmarks and their baselines (the research's per-frame loader, the naive index).

Nothing is imported here: ``affpipe.bench.gpu`` must import on a bare GPU host.
"""
