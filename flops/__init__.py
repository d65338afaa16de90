"""FLOps: federated-learning operations over MQTT (see README.md and ../shared/ARCHITECTURE.md)."""
