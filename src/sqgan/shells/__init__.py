"""Shells: the plain loop run by Ray Train and Ray Tune, on KubeRay and Kubeflow, logged to MLflow."""
