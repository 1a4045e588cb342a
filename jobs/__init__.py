"""Jobs: specs, validation, sharding, the object store, shard runs, results and usage.

Nothing here imports Celery or workers/: `workers/` binds these functions to tasks and
hands in what they need (the engine, a function that queues shards).
"""
