"""The worker's side of kombu's Redis transport: an atomic take for every queue it serves.

kombu keeps a queue in Redis as a list, and a delivered message, until acknowledged, in the
`unacked` hash and `unacked_index` sorted set. Its own consumer pops a message (BRPOP) before
it records it there: a process killed in between loses that job. Here every take, by Celery's
consumer (`transport.Transport`, chosen by the app as its broker transport) and by the row lane,
pops and records in one Lua script (`take.lua`), and records which process holds the message
(`holders`), so the jobs of a process that died go back to their queue in seconds instead of
after the visibility timeout.
"""
