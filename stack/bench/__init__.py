"""`python -m stack.bench`: how fast the queue serves, against what the model allows.

run: the run and its command line; jobs: measurements through the queue; local: the model
in-process and bulk scoring; report: ratios, goals and the printed table; config: sizes.
"""
