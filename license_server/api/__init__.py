"""REST blueprints, one per domain concept; all JSON, all under ``/v1`` except probes."""
