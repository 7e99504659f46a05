"""The verifier sidecar (customer host) and the client library inference processes import."""
