"""The HTTP gateway: the seed's API and job endpoints in front of the queues."""
