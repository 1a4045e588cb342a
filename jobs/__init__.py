"""Jobs: specs, validation, sharding, the object store, shard runs, results and usage.

Nothing here imports Celery (except client.py, lazily): `workers/` binds these functions
to tasks, and the engine is handed in by the caller.
"""
