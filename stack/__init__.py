"""Tools that run the whole stack on one machine: the demo (`python -m stack.demo`), the
benchmark (`python -m stack.bench`), a private redis-server, and starting worker and beat
processes. The top layer: it imports every other package; nothing imports it."""
