from batchlog.cli import entrypoint

entrypoint()
