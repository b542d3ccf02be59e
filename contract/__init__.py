"""The wire contract: task, queue and Redis key names (names), request and result schemas
(schemas), the task message format (envelope) and the error tree (errors).

The bottom layer: it imports nothing else of this project; producer, training, worker and
the tools above them import it."""
