"""The request loop: validation, continuous batching, streaming handles, runners."""
