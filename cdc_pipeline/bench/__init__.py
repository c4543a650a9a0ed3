"""`cdc-pipeline bench`: one command, one machine, one run of the whole pipeline under load.

Scenarios (see README "Benchmark"): an initial snapshot, a burst of updates in large transactions, a
catch-up from a full Kafka topic by the stream and by a plain single-process consumer (the baseline),
and end-to-end latency under a steady background load; the peak memory of every component is sampled
throughout. The stream is always the repo's own application, started the way the product starts it
(`spark-submit` of `cdc_pipeline/streaming/app.py`, see `cdc_pipeline.streaming.launch`), so the figures
follow whatever apply path the repo has. Free of Dagster objects; no part of the test suite's timing.
"""

SCENARIOS = ("snapshot", "burst", "catchup", "latency")
