"""Serving front doors: the served engine actor and its client, the OpenAI HTTP API, batch jobs."""
