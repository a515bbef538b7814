"""MLflow's system metrics (CPU, memory, disk, network; NVIDIA GPUs) for a run held by id."""
from __future__ import annotations

import sys
import threading

from mlflow.tracking import MlflowClient

SYSTEM_METRICS_INTERVAL_S = 10.0  # one sample per 10 s (MLflow's default)

class SystemMetrics:
    """MLflow's own SystemMetricsMonitor (CPU, memory, disk, network; NVIDIA GPUs through
    nvidia-ml-py) for a run we hold by id: mlflow.start_run(log_system_metrics=True) would make it
    the process's active run. It samples in a daemon thread every SYSTEM_METRICS_INTERVAL_S
    (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it, as in MLflow) and stops by itself once
    the run is no longer RUNNING; a SIGKILL ends the thread with the process."""

    def __init__(self, monitor) -> None:
        self._monitor = monitor
        self._first_step = monitor._logging_step

    @classmethod
    def start(cls, client: MlflowClient, run_id: str, resume: bool) -> "SystemMetrics | None":
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # resume_logging: a resumed run's samples continue after its last step, not over it.
            monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                           resume_logging=resume, tracking_uri=client.tracking_uri)
            monitor.start()
            return cls(monitor)
        except Exception as e:
            print(f"warning: MLflow system metrics are off ({type(e).__name__}: {e})", file=sys.stderr)
            return None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Flush the last samples; never wait more than `timeout_s` (a store that hangs)."""
        def finish() -> None:
            m = self._monitor
            m.finish()  # stops MLflow's thread and flushes what it recorded
            if m._logging_step == self._first_step:
                # Its thread published nothing: the run was shorter than one interval, or it gave
                # up on one failed status look-up (a busy SQLite store). One sample, so a run with
                # system metrics on always has them.
                m.collect_metrics()
                m.publish_metrics(m.aggregate_metrics())
                m.mlflow_logger.flush()

        worker = threading.Thread(target=finish, daemon=True, name="system-metrics-stop")
        worker.start()
        worker.join(timeout_s)

