"""Replay a range of a pipeline's Kafka topics into ClickHouse, as a Spark batch job with the same
writer as the stream (`ChangeApplier`), so a replayed change lands exactly as it did the first time.

Idempotent: rows carry versions from their source position, so replaying changes that are already
applied leaves every table's FINAL state unchanged, and replaying changes that were lost restores
them without overwriting anything newer.

    spark-submit ... cdc_pipeline/streaming/replay.py --config pipeline.yaml \\
        --starting-offsets '{"shop.public.orders": {"0": 100}}' --ending-offsets '{"shop.public.orders": {"0": 200}}'

Ending offsets are exclusive. Prints one line starting with `REPLAY-RESULT ` with the counts (for people), and
with `--result-file PATH` writes them as JSON to PATH (for programs: spark-submit's own log lines share the
output and can land in the middle of a printed line, so callers read the file, never the output).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pyspark.sql import SparkSession

from cdc_pipeline.clickhouse_client import connect_clickhouse
from cdc_pipeline.config import load_pipeline_config
from cdc_pipeline.control.replay_runner import read_result as read_result  # the reader's side, kept here too
from cdc_pipeline.settings import Settings
from cdc_pipeline.streaming.app import bind_to_jvm, read_kafka_range
from cdc_pipeline.streaming.apply import BatchStats, ChangeApplier
from cdc_pipeline.streaming.dlq import DeadLetters
from cdc_pipeline.streaming.evolution import SchemaEvolution
from cdc_pipeline.streaming.sink import ClickHouseSink
from cdc_pipeline.streaming.sinks import build_sink

RESULT_PREFIX = "REPLAY-RESULT "
# Replays never collide with the stream's batch ids (0, 1, ...) in logs and dead-letter headers.
REPLAY_BATCH_ID = -1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bind_to_jvm()  # never outlive the spark-submit JVM (see app.bind_to_jvm)
    parser = argparse.ArgumentParser(description="Replay a Kafka offset range into the ClickHouse replicas.")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--starting-offsets", required=True, help='JSON {"topic": {"partition": offset}}')
    parser.add_argument("--ending-offsets", required=True, help="JSON, exclusive ends, same topics")
    parser.add_argument("--result-file", type=Path, default=None, help="write the counts as JSON to this file")
    args = parser.parse_args(argv)
    starting = json.loads(args.starting_offsets)
    ending = json.loads(args.ending_offsets)
    settings = Settings()
    pipeline = load_pipeline_config(args.config)
    unknown = [topic for topic in starting if pipeline.table_for_topic(topic) is None]
    if unknown:
        parser.error(f"{unknown} are not topics of pipeline {pipeline.name}")
    password = settings.clickhouse_password.get_secret_value() if settings.clickhouse_password else None
    database = pipeline.clickhouse_database(settings.clickhouse_database)

    spark = SparkSession.builder.appName(f"{pipeline.query_name}_replay").getOrCreate()
    records = read_kafka_range(spark, settings, starting, ending)
    result: dict[str, BatchStats] = {}
    evolution = SchemaEvolution.from_settings(pipeline, settings)
    applier = ChangeApplier(
        pipeline,
        database,
        build_sink(
            pipeline,
            settings,
            ClickHouseSink(
                connect_clickhouse(settings.clickhouse_endpoint, settings.clickhouse_user, password), evolution
            ),
            evolution,
        ),
        DeadLetters(settings.kafka_bootstrap_servers, pipeline.dlq_topic),
        on_batch=lambda stats: result.update(stats=stats),
    )
    count = records.count()
    applier(records, REPLAY_BATCH_ID)
    stats = result["stats"]
    summary = {
        "records": count, "applied_rows": stats.applied_rows, "deleted_rows": stats.deleted_rows,
        "truncates": stats.truncates, "dlq_count": stats.dlq_count, "tables": stats.tables,
    }  # fmt: skip
    if args.result_file is not None:
        partial = args.result_file.with_name(args.result_file.name + ".partial")
        partial.write_text(json.dumps(summary))
        partial.replace(args.result_file)  # whole or absent, never half written
    print(RESULT_PREFIX + json.dumps(summary), flush=True)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
