"""The Celery app, configured from the environment: `celery -A workers.app worker`.

Celery only moves shard descriptions (job id, shard index, shard count, store URL, retry
attempt) between machines; the work itself lives in `jobs/`.
"""

from __future__ import annotations

from celery import Celery

from jobs import settings
from jobs.spec import DEFAULT_QUEUE

# Redis redelivers an unacknowledged task after the visibility timeout. Shards are
# acknowledged only when they finish (acks_late), so this must exceed the longest shard or
# a healthy shard would be run twice; crashed workers are caught far sooner by shard leases
# (workers/leases.py), whose watchdog puts their deliveries back (workers/dispatch.py).
VISIBILITY_TIMEOUT_SECONDS = 12 * 3600


def _transport_options(broker: str) -> dict:
    if broker.startswith("filesystem://"):
        root = settings.home() / "broker"
        folders = {"data_folder_in": root / "queue", "data_folder_out": root / "queue",
                   "control_folder": root / "control", "processed_folder": root / "processed"}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        return {name: str(path) for name, path in folders.items()} | {"store_processed": False}
    return {"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS}


def create_app(broker_url: str | None = None) -> Celery:
    broker = broker_url or settings.broker_url()
    app = Celery("batchinfer", include=["workers.tasks", "workers.nightly_tasks"])
    app.conf.update(
        broker_url=broker,
        broker_transport_options=_transport_options(broker),
        broker_connection_retry_on_startup=True,
        # JSON only: a message on the broker must never be able to execute code.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # A shard is acknowledged when it is done, and given back if its worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=DEFAULT_QUEUE,
        # Redis: take a shard only when a pool thread is free (at most
        # BATCHINFER_WORKER_SHARDS held, running, none waiting ahead of them). A
        # prefetched shard would wait behind a long one while other workers idle, and a
        # worker that loses its connection would strand it in Redis's unacked set.
        worker_disable_prefetch=broker.startswith(("redis://", "rediss://")),
        # Events let Flower follow tasks without being told by each worker.
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
    )
    return app


app = create_app()
