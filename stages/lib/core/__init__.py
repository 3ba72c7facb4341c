"""The bottom layer: errors, the stage bootstrap, typed params, the thread budget, parallel map, content
digests, latency timing and MLflow tracking. Imports nothing else of stages.lib."""
