"""The row lane: single-row jobs served in batches inside each worker process.

transport: kombu's Redis layout (take, hold, release) and result writes; server: the
thread that reads, predicts and answers each job.
"""
