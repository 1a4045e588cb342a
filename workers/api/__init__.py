"""`batchinfer serve`: the OpenAI Files and Batches API over the same store and queue as
the CLI (app.py: the routes; auth.py: API keys; objects.py: files and batch records in the
store; batches.py: a batch's life from its job's manifest)."""
