"""The floor: errors, atomic files, checkpoint format, results file, distributed runtime, logging and CLI edge.

Nothing here imports another package of the project.
"""
