"""KEDA External Scaler: serves telepipe's desired replicas per service to KEDA."""

from sinks.keda.scaler import KedaScaler, metric_name

__all__ = ["KedaScaler", "metric_name"]
