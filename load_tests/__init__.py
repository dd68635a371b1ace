"""trillm's load-test suite: Locust users on trillm_client that measure what LLM
users feel (time to first token, inter-token latency, output tokens/s, errors).

- ``locustfile.py``: the Locust layer (users, load shape, events); runs under
  plain ``locust -f load_tests/locustfile.py`` as well as under ``run.py``.
- ``options.py``: the suite's options, declared once for Locust and ``run.py``.
- ``prompts.py``: prompts of controlled token lengths, from a fixed seed.
- ``shapes.py``: constant users, step ramp and constant request rate.
- ``metrics.py``: per-request records, ``summary.json`` and the pass/fail thresholds.
- ``plots.py``: the PNG plots of a run and of a concurrency sweep.
- ``run.py``: ``make load`` / ``load-sweep`` / ``load-ui`` (server lifecycle, bounded runs).
"""
