"""The generated gRPC contract (``make proto`` writes it from ``proto/tlsroll/v1``)."""
