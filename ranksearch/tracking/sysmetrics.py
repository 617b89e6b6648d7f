"""MLflow's system metrics on a trial's run while it trains: `system/cpu_...`,
`system/system_memory_usage_megabytes`, disk, network, and `system/gpu_...` where nvidia-ml-py
finds a GPU; the whole machine's, every `tracking.system_metrics_seconds`."""

from __future__ import annotations

from typing import Any


def watch(run_id: str, seconds: float, tracking_uri: str, resume: bool) -> Any:
    """A started SystemMetricsMonitor on the run; `resume`: a re-attached run continues its
    steps."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # mlflow: lazy

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=seconds, resume_logging=resume, tracking_uri=tracking_uri
    )
    monitor.start()
    return monitor


def finish_watch(monitor: Any) -> None:
    """Stop a trial's SystemMetricsMonitor and log what it sampled, before the run closes. MLflow's
    loop drops the samples of its last, unfinished interval, so a trial shorter than
    `tracking.system_metrics_seconds` (a warm worker's takes under a second) would get none."""
    monitor.finish()
    monitor.collect_metrics()  # the trial's end: psutil measures CPU since the sample before
    if leftover := monitor.aggregate_metrics():
        monitor.publish_metrics(leftover)
        monitor.mlflow_logger.flush()
