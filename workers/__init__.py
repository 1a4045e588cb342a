"""Celery glue: the app, the shard and nightly tasks, beat, Flower, and the worker launcher."""
