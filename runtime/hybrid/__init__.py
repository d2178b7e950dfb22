"""The hybrid driver: starts and wires the executor actors on Ray, places neurons, traces."""
