"""replay: re-apply a range of a table's topic (offsets or a time window, control/replay_range.py) with
the Spark batch job, in its own process group with a timeout (control/replay_runner.py)."""

import time

from dagster import AssetObservation, Config, Failure, JobDefinition, OpExecutionContext, job, op
from pydantic import Field

from cdc_pipeline.control.backfill import end_offsets
from cdc_pipeline.control.replay_range import ReplayRangeError, replay_range
from cdc_pipeline.control.replay_runner import ReplayTimeout, replay_arguments, run_replay
from cdc_pipeline.defs.common import stream_env
from cdc_pipeline.defs.jobs.backfill_job import configured_table
from cdc_pipeline.defs.translator import CdcTranslator
from cdc_pipeline.resources import ClickHouseResource, ControlPlaneResource, KafkaResource, SparkResource
from cdc_pipeline.streaming import replay as replay_app
from cdc_pipeline.streaming.launch import submit_env


class ReplayConfig(Config):
    table: str = Field(
        description='Source table whose topic is replayed, as in pipeline.yaml (`public.orders`, `public."User"`).'
    )
    start_offset: int | None = Field(default=None, description="First offset (partition 0), inclusive.")
    end_offset: int | None = Field(default=None, description="Last offset, exclusive; default the current end.")
    start_time: str | None = Field(default=None, description="ISO 8601 start of a time window (instead of offsets).")
    end_time: str | None = Field(default=None, description="ISO 8601 end of the time window; default now.")
    timeout_s: float = Field(default=3600, description="Stop the Spark job and fail if it has not finished by then.")


REPLAY_NOTE_S = 30.0  # a replay logs that it is still at work this often


def build_replay_job(translator: CdcTranslator) -> JobDefinition:
    @op(
        name=translator.name("replay_op"),
        description="Replay a range of a table's topic into ClickHouse (Spark batch job, same writer as the stream).",
    )
    @translator.with_resource_keys
    def replay_op(
        context: OpExecutionContext,
        config: ReplayConfig,
        control_plane: ControlPlaneResource,
        spark: SparkResource,
        kafka: KafkaResource,
        clickhouse: ClickHouseResource,
    ) -> None:
        pipeline = control_plane.load()
        table = configured_table(pipeline, config.table)
        if (config.start_offset is None) == (config.start_time is None):
            raise Failure("give exactly one of start_offset or start_time")
        topic = pipeline.topic_for(table)
        consumer = kafka.consumer(f"{pipeline.consumer_group}-replay")
        try:
            if not end_offsets(consumer, topic):
                raise Failure(f"topic {topic} does not exist: nothing was captured for {table.name} yet")
            start, end = replay_range(
                consumer, topic, config.start_offset, config.end_offset, config.start_time, config.end_time
            )
        except ReplayRangeError as exc:
            raise Failure(str(exc)) from None
        finally:
            consumer.close()
        if end <= start:
            context.log.info(f"{topic}: empty range [{start}, {end}), nothing to replay")
            return
        context.log.info(
            f"replaying {topic} offsets [{start}, {end}) ({end - start} records) with spark-submit on {spark.master}"
        )
        # spark-submit in its own process group, stopped on timeout (control/replay_runner.py).
        started = time.monotonic()
        try:
            outcome = run_replay(
                lambda result_file: spark.submit().argv(
                    replay_app.__file__,
                    *replay_arguments(control_plane.resolved_config_path, topic, start, end, result_file),
                    name=f"{pipeline.query_name}_replay",
                ),
                env=submit_env(stream_env(kafka, clickhouse, control_plane), master=spark.master),
                timeout_s=config.timeout_s,
                on_progress=lambda elapsed: context.log.info(
                    f"replay of {topic} [{start}, {end}): {end - start} records, running for {elapsed:.0f} s"
                ),
                note_every_s=REPLAY_NOTE_S,
            )
        except ReplayTimeout as exc:
            raise Failure(
                f"replay of {topic} [{start}, {end}) did not finish in {config.timeout_s:.0f} s and "
                "was stopped; nothing is lost (a replay only re-applies), run it again with a larger "
                "timeout_s or a smaller range:\n" + "\n".join(exc.tail)
            ) from None
        summary = outcome.result
        if outcome.returncode != 0 or summary is None:
            raise Failure(f"replay of {topic} failed (exit {outcome.returncode}):\n" + "\n".join(outcome.output[-40:]))
        summary.update(topic=topic, start_offset=start, end_offset=end, seconds=round(time.monotonic() - started, 1))
        context.log.info(f"replayed: {summary}")
        for key in translator.replica_keys(table):
            context.log_event(AssetObservation(asset_key=key, metadata={"replay": summary}))

    @job(
        name=translator.name("replay"),
        description="Replay a topic range (offsets or a time window) into ClickHouse; idempotent.",
    )
    def replay() -> None:
        replay_op()

    return replay
