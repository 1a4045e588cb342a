"""A minimal Celery app for the foundation test: proves a real worker process can take a
task from the test Redis and return its result."""

import os

from celery import Celery

app = Celery("echo", broker=os.environ["ECHO_BROKER_URL"], backend=os.environ["ECHO_BROKER_URL"])
app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")


@app.task(name="echo.add")
def add(a: int, b: int) -> int:
    return a + b
